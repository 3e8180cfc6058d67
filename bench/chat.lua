-- wrk script of bench/run: POST /v1/chat/completions with a buyer key and a model per request.
--
--   wrk ... -s bench/chat.lua <url> -- <keys file> <models,comma,separated> <stream 0|1> <max_tokens> [mode] [raw]
--
-- mode "random" (default): each request takes a random key and a random model, from requests built once
-- in init() so that request() costs a table lookup. mode "sweep": each thread walks its share of the keys
-- in order (a warm-up that touches every buyer). done() prints one line "BENCH_JSON {...}" with the
-- counts and the latency distribution (microseconds) for bench/bench.py.
--
-- wrk corrects its latency histogram for coordinated omission (stats_correct: a stall of S adds samples at
-- S - i * the mean interval between requests of a connection). At one connection that interval is tens of
-- microseconds, so a single scheduler stall of the load generator becomes hundreds of samples. With
-- "raw" (meant for -c1), request() also records the time between consecutive requests of the thread: one
-- request's latency plus wrk's turnaround, no correction; done() adds those percentiles as raw_*.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now_us()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
   return tonumber(timespec.tv_sec) * 1000000 + math.floor(tonumber(timespec.tv_nsec) / 1000)
end

local prebuilt = 8192
local requests = {}
local n = 0
local counter = 0
local sweep = false
local raw = false
local last_us = nil
-- Per thread: microseconds -> count (read by done() through thread:get).
raw_histogram = {}

local threads = {}

function setup(thread)
   thread:set("thread_id", #threads)
   table.insert(threads, thread)
end

local function split(text, sep)
   local out = {}
   for item in string.gmatch(text, "[^" .. sep .. "]+") do
      table.insert(out, item)
   end
   return out
end

local function body(model, stream, max_tokens)
   local tail = ""
   if stream then
      tail = ',"stream":true,"stream_options":{"include_usage":true}'
   end
   return '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are a helpful assistant."},'
      .. '{"role":"user","content":"Write one short sentence about latency."}],"max_tokens":' .. max_tokens
      .. tail .. '}'
end

local function build(key, model, stream, max_tokens)
   local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
   return wrk.format("POST", "/v1/chat/completions", headers, body(model, stream, max_tokens))
end

function init(args)
   local keys = {}
   for line in io.lines(args[1]) do
      if #line > 0 then
         table.insert(keys, line)
      end
   end
   local models = split(args[2], ",")
   local stream = args[3] == "1"
   local max_tokens = tonumber(args[4]) or 16
   sweep = args[5] == "sweep"
   raw = args[6] == "raw"
   local id = tonumber(thread_id) or 0
   math.randomseed(os.time() + id * 7919)
   if sweep then
      -- The thread count is unknown here, so every thread walks all keys from its own offset: each thread
      -- alone covers every key within one pass.
      for i = 0, #keys - 1 do
         local key = keys[((i + id * 7) % #keys) + 1]
         table.insert(requests, build(key, models[(i % #models) + 1], stream, max_tokens))
      end
   else
      for _ = 1, prebuilt do
         table.insert(requests, build(keys[math.random(#keys)], models[math.random(#models)], stream, max_tokens))
      end
   end
   n = #requests
end

function request()
   if raw then
      local t = now_us()
      if last_us then
         local d = t - last_us
         raw_histogram[d] = (raw_histogram[d] or 0) + 1
      end
      last_us = t
   end
   if sweep then
      counter = counter + 1
      return requests[(counter % n) + 1]
   end
   return requests[math.random(n)]
end

-- Percentiles of the merged raw histograms of every thread, as a JSON fragment (empty without "raw").
local function raw_summary()
   local merged, count = {}, 0
   for _, thread in ipairs(threads) do
      for us, c in pairs(thread:get("raw_histogram") or {}) do
         merged[us] = (merged[us] or 0) + c
         count = count + c
      end
   end
   if count == 0 then
      return ""
   end
   local keys = {}
   for us in pairs(merged) do
      table.insert(keys, us)
   end
   table.sort(keys)
   local sum = 0
   for _, us in ipairs(keys) do
      sum = sum + us * merged[us]
   end
   local function percentile(q)
      local rank, seen = math.ceil(q / 100 * count), 0
      for _, us in ipairs(keys) do
         seen = seen + merged[us]
         if seen >= rank then
            return us
         end
      end
      return keys[#keys]
   end
   return string.format(',"raw_count":%d,"raw_mean_us":%.1f,"raw_p50_us":%d,"raw_p90_us":%d,"raw_p99_us":%d,'
      .. '"raw_p999_us":%d,"raw_max_us":%d', count, sum / count, percentile(50), percentile(90), percentile(99),
      percentile(99.9), keys[#keys])
end

function done(summary, latency, requests)
   local e = summary.errors
   local function p(q)
      return latency:percentile(q)
   end
   io.write(string.format(
      'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect_errors":%.0f,"read_errors":%.0f,'
         .. '"write_errors":%.0f,"status_errors":%.0f,"timeouts":%.0f,"lat_min_us":%.0f,"lat_max_us":%.0f,'
         .. '"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"p50_us":%.0f,"p75_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,'
         .. '"p999_us":%.0f,"p9999_us":%.0f%s}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.max, latency.mean, latency.stdev, p(50), p(75), p(90), p(99), p(99.9), p(99.99),
      raw_summary()))
end
