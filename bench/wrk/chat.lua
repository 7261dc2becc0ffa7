-- wrk script for bench/gateway_bench.py: POST one non-streaming chat completion per request.
--
-- Environment (set by the bench):
--   BENCH_BODY     the JSON request body (default: a small llama-3.2-3b-instruct chat)
--   BENCH_API_KEY  sent as "Authorization: Bearer <key>" (default: "bench")
--   BENCH_HEADERS  extra headers, "Name: value" pairs separated by "\n" (e.g. Portkey's
--                  x-portkey-provider / x-portkey-custom-host)
-- At the end it prints one line "BENCH_JSON {...}" with the latency percentiles (microseconds),
-- request count, error counts and duration, which the bench parses.

local body = os.getenv("BENCH_BODY")
if body == nil or body == "" then
  body = '{"model":"llama-3.2-3b-instruct","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
end
local key = os.getenv("BENCH_API_KEY")
if key == nil or key == "" then key = "bench" end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key

local extra = os.getenv("BENCH_HEADERS")
if extra ~= nil and extra ~= "" then
  for line in string.gmatch(extra, "[^\n]+") do
    local name, value = string.match(line, "^%s*([^:]+):%s*(.-)%s*$")
    if name ~= nil then wrk.headers[name] = value end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
