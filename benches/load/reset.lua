-- wrk script: valid password-reset requests, a new address each time (no per-email denials).
local counter = 0
local token = os.getenv("BENCH_CLIENT_TOKEN") or "bench-client-token"
request = function()
  counter = counter + 1
  return wrk.format("GET", "/users/password/reset.json?email=user" .. counter .. "%40example.com",
    { ["QB-Token"] = token })
end
