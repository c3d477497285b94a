-- wrk script for bench/bench_api.py (not meant to be run by hand).
--
-- BENCH_MODE=sign: every call POSTs a new signing request (its own model version and file
-- digests, so each one is a real signature); a response counts as signed only if it is a
-- 201 whose body says "state":"signed" and names the key. BENCH_MODE=trivial: POSTs the same
-- body to the reference endpoint; a response counts if it is a 200 with {"ok":true}.
-- done() prints one JSON line (prefixed RESULT) that bench_api.py reads.

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  mode = os.getenv("BENCH_MODE")
  run = os.getenv("BENCH_RUN")
  path = os.getenv("BENCH_PATH")
  nres = tonumber(os.getenv("BENCH_RESOURCES"))
  every = tonumber(os.getenv("BENCH_SAMPLE_EVERY"))
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
  wrk.headers["Content-Type"] = "application/json"
  n, good, bad, samples, first_bad = 0, 0, 0, {}, ""
end

function request()
  n = n + 1
  local version = string.format("%s-%d-%d", run, tid, n)
  local files = {}
  for i = 1, nres do
    files[i] = string.format('{"name":"shard-%03d.safetensors","algorithm":"sha256","digest":"%s%08x%08x%08x"}',
      i, string.rep("5a", 20), tid, n, i)
  end
  local body = '{"model":"bench-model","version":"' .. version .. '","environment":"staging",'
    .. '"resources":[' .. table.concat(files, ",") .. '],'
    .. '"ci":{"repository":"https://git.example.com/ml/bench-model","commit":"' .. string.format("%040x", n)
    .. '","ref":"refs/heads/main","pipeline_url":"https://ci.example.com/pipelines/' .. n .. '"}}'
  return wrk.format("POST", path, nil, body)
end

function response(status, headers, body)
  local ok
  if mode == "sign" then
    ok = status == 201 and body:find('"state":"signed"', 1, true) ~= nil
      and body:find('"key":{"id":', 1, true) ~= nil
  else
    ok = status == 200 and body == '{"ok":true}'
  end
  if ok then
    good = good + 1
    if mode == "sign" and good % every == 1 then
      local id = body:match('^{"id":"([%x%-]+)"')
      local version = body:match('"version":"([^"]+)"')
      table.insert(samples, (id or "?") .. " " .. (version or "?"))
    end
  else
    bad = bad + 1
    if first_bad == "" then first_bad = status .. " " .. body:sub(1, 300) end
  end
end

local function quote(s)
  return '"' .. s:gsub('\\', '\\\\'):gsub('"', '\\"'):gsub('[%c]', ' ') .. '"'
end

function done(summary, latency, requests)
  local good_total, bad_total, all, why = 0, 0, {}, ""
  for _, thread in ipairs(threads) do
    good_total = good_total + thread:get("good")
    bad_total = bad_total + thread:get("bad")
    for _, s in ipairs(thread:get("samples")) do table.insert(all, quote(s)) end
    if why == "" then why = thread:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"good":%d,"bad":%d,"connect_errors":%d,'
    .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"non_2xx":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,"first_bad":%s,"samples":[%s]}\n',
    summary.requests, summary.duration, good_total, bad_total, e.connect, e.read, e.write,
    e.timeout, e.status, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, quote(why), table.concat(all, ",")))
end
