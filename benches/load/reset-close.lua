-- wrk script: as reset.lua, but every request on a new connection (Connection: close).
local counter = 0
local token = os.getenv("BENCH_CLIENT_TOKEN") or "bench-client-token"
request = function()
  counter = counter + 1
  return wrk.format("GET", "/users/password/reset.json?email=user" .. counter .. "%40example.com",
    { ["QB-Token"] = token, ["Connection"] = "close" })
end
