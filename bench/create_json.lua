-- Create with JSON: POST /resources/data/.
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
wrk.method = "POST"
wrk.path = "/resources/data/"
wrk.body = '{"name": "peter", "locale": "NYC", "age": 42}'
wrk.headers["Content-Type"] = "application/json"
