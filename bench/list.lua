-- Walk the list: follow "next" from page to page (limit 50), starting over at the end.
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
local next_path = "/resources/data/?limit=50"
request = function()
  return wrk.format("GET", next_path)
end
response = function(status, headers, body)
  local found = body:match('"next":"([^"]+)"')
  next_path = found or "/resources/data/?limit=50"
end
