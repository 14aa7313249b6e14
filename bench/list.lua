-- Walk the list: follow "next" from page to page (limit 50), starting over at the end.
local next_path = "/resources/data/?limit=50"
request = function()
  return wrk.format("GET", next_path)
end
response = function(status, headers, body)
  local found = body:match('"next":"([^"]+)"')
  next_path = found or "/resources/data/?limit=50"
end
