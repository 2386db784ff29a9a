-- wrk script: POST one fixed SGLang /generate body and print a machine-readable summary.
--
-- BENCH_BODY (env) or BENCH_BODY_FILE overrides the body; the default is a ~100-byte input_ids
-- request.
-- The summary line starts with BENCH_RESULT and holds JSON; latencies are in microseconds.
-- No per-response callback is defined, so wrk stays on its fast path.

local default_body =
  '{"input_ids":[1,2,3,4,5,6,7,8],"sampling_params":{"max_new_tokens":16,"temperature":0},"stream":false}'

-- BENCH_METHOD=GET sends GETs without a body (e.g. /engine_metrics).
wrk.method = os.getenv("BENCH_METHOD") or "POST"
-- BENCH_BODY_FILE names a file holding the body, for bodies too big for the environment.
local function file_body()
  local path = os.getenv("BENCH_BODY_FILE")
  if not path then return nil end
  local f = assert(io.open(path, "rb"))
  local body = f:read("*a")
  f:close()
  return body
end

if wrk.method ~= "GET" then
  wrk.body = os.getenv("BENCH_BODY") or file_body() or default_body
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"mean_us":%.1f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
