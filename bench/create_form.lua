-- Create with the original contract: PUT /resources/data/ with form field data=<JSON>.
wrk.method = "PUT"
wrk.path = "/resources/data/"
wrk.body = 'data={"name": "peter", "locale": "NYC", "age": 42}'
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
