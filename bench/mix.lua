-- The 90/10 mix: nine reads of a random existing person for every form PUT create.
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
local rows = tonumber(os.getenv("ROWS") or "1000")
local body = 'data={"name": "peter", "locale": "NYC", "age": 42}'
local form = { ["Content-Type"] = "application/x-www-form-urlencoded", ["Authorization"] = wrk.headers["Authorization"] }
math.randomseed(os.time())
request = function()
  if math.random(1, 10) == 1 then
    return wrk.format("PUT", "/resources/data/", form, body)
  end
  return wrk.format("GET", "/resources/data/" .. math.random(1, rows))
end
