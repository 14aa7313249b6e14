-- One fixed list page: PAGE_AFTER=0 is the first page, PAGE_AFTER=900000 one 900,000 rows deep;
-- PAGE_QUERY adds filters (for example "&locale=SF").
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
local path = "/resources/data/?limit=50&after=" .. (os.getenv("PAGE_AFTER") or "0") .. (os.getenv("PAGE_QUERY") or "")
request = function()
  return wrk.format("GET", path)
end
