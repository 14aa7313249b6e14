-- Bulk create: POST /resources/data/ with an array of BATCH people (bench/run.py --batch N).
-- TOKEN (set by bench/run.py) is sent as a bearer token, as production requires.
if os.getenv("TOKEN") then wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN") end
local people = {}
for i = 1, tonumber(os.getenv("BATCH") or "100") do
  people[i] = '{"name": "peter ' .. i .. '", "locale": "NYC", "age": ' .. (i % 151) .. '}'
end
wrk.method = "POST"
wrk.path = "/resources/data/"
wrk.body = "[" .. table.concat(people, ", ") .. "]"
wrk.headers["Content-Type"] = "application/json"
