-- Create with JSON: POST /resources/data/.
wrk.method = "POST"
wrk.path = "/resources/data/"
wrk.body = '{"name": "peter", "locale": "NYC", "age": 42}'
wrk.headers["Content-Type"] = "application/json"
