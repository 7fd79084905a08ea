-- wrk script: valid password-reset requests, a new address each time (no per-email denials).
-- wrk restarts the counter with every run, so each run's addresses carry a prefix of their
-- own, read from /dev/urandom: a store that outlives one run (Redis, or a gateway measured in
-- rounds) would otherwise see the next run's addresses again and, past their per-email
-- quota, deny them (under uniform answers, still as 200s).
local random = io.open("/dev/urandom", "rb")
local run = random:read(6):gsub(".", function(c) return string.format("%02x", c:byte()) end)
random:close()
local counter = 0
local headers = { ["QB-Token"] = os.getenv("BENCH_CLIENT_TOKEN") or "bench-client-token" }
-- BENCH_CLOSE=1: every request on a new connection.
if os.getenv("BENCH_CLOSE") == "1" then
  headers["Connection"] = "close"
end
request = function()
  counter = counter + 1
  return wrk.format("GET", "/users/password/reset.json?email=user" .. run .. "." .. counter .. "%40example.com",
    headers)
end
