-- wrk script: as reset.lua, but every request on a new connection (Connection: close).
-- wrk restarts the counter with every run, so each run's addresses carry a prefix of their
-- own, read from /dev/urandom: a store that outlives one run (Redis, or a gateway measured in
-- rounds) would otherwise see the next run's addresses again and, past their per-email
-- quota, deny them (under uniform answers, still as 200s).
local random = io.open("/dev/urandom", "rb")
local run = random:read(6):gsub(".", function(c) return string.format("%02x", c:byte()) end)
random:close()
local counter = 0
local token = os.getenv("BENCH_CLIENT_TOKEN") or "bench-client-token"
request = function()
  counter = counter + 1
  return wrk.format("GET", "/users/password/reset.json?email=user" .. run .. "." .. counter .. "%40example.com",
    { ["QB-Token"] = token, ["Connection"] = "close" })
end
