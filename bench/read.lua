-- Read by id: GET a random existing person (ids 1..ROWS, seeded first).
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
-- FORWARDED_FOR (bench/compare.py --production): the header nginx adds, sent as nginx would send it.
if os.getenv("FORWARDED_FOR") then wrk.headers["X-Forwarded-For"] = os.getenv("FORWARDED_FOR") end
local rows = tonumber(os.getenv("ROWS") or "1000")
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/resources/data/" .. math.random(1, rows))
end
