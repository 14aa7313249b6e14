-- Create with the original contract: PUT /resources/data/ with form field data=<JSON>.
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
-- FORWARDED_FOR (bench/compare.py --production): the header nginx adds, sent as nginx would send it.
if os.getenv("FORWARDED_FOR") then wrk.headers["X-Forwarded-For"] = os.getenv("FORWARDED_FOR") end
wrk.method = "PUT"
wrk.path = "/resources/data/"
wrk.body = 'data={"name": "peter", "locale": "NYC", "age": 42}'
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
