-- One fixed list page: PAGE_AFTER=0 is the first page, PAGE_AFTER=900000 one 900,000 rows deep.
local path = "/resources/data/?limit=50&after=" .. (os.getenv("PAGE_AFTER") or "0")
request = function()
  return wrk.format("GET", path)
end
