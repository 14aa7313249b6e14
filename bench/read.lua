-- Read by id: GET a random existing person (ids 1..ROWS, seeded first).
local rows = tonumber(os.getenv("ROWS") or "1000")
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/resources/data/" .. math.random(1, rows))
end
