# frozen_string_literal: true

# Shared by every benchmark under bench/: statistics over repeats, the
# environment (versions, nproc, date), CPU accounting across process trees
# from /proc, and the results file format (bench/results/<name>.json).
#
# Result file format (bench/report.rb reads it):
#   { "name", "date", "env" => {ruby, libzmq, msgpack_c, msgpack_gem, postgresql, redis, sidekiq, nproc, ...},
#     "parameters" => {...}, "targets" => [{ "label", "ours", "peer", "metric", "min_ratio" }],
#     "rows" => [{ "label", "contender" ("ours"|peer name), "metric", "unit", "median", "min", "max",
#                  "q1", "q3", "samples" => [...], extra figures... }] }

$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "json"
require "etc"
require "time"
require "open3"
require "fileutils"
require "tmpdir"

module Bench
  ROOT = File.expand_path("../..", __dir__)
  RESULTS = File.join(ROOT, "bench", "results")
  CLK_TCK = 100.0 # sysconf(_SC_CLK_TCK) on Linux (USER_HZ)

  module_function

  def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # --- statistics --------------------------------------------------------

  def quantile(sorted, q)
    return nil if sorted.empty?

    pos = (sorted.size - 1) * q
    lo = sorted[pos.floor]
    hi = sorted[pos.ceil]
    lo + (hi - lo) * (pos - pos.floor)
  end

  def summary(samples)
    s = samples.compact.sort
    return { "median" => nil, "min" => nil, "max" => nil, "q1" => nil, "q3" => nil, "samples" => samples } if s.empty?

    { "median" => quantile(s, 0.5), "min" => s.first, "max" => s.last,
      "q1" => quantile(s, 0.25), "q3" => quantile(s, 0.75), "samples" => samples }
  end

  def row(label:, contender:, metric:, unit:, samples:, **extra)
    { "label" => label, "contender" => contender, "metric" => metric, "unit" => unit }
      .merge(summary(samples)).merge(extra.transform_keys(&:to_s))
  end

  # --- environment -------------------------------------------------------

  def capture(*cmd)
    out, status = Open3.capture2e(*cmd)
    status.success? ? out.strip : nil
  rescue SystemCallError
    nil
  end

  def env
    @env ||= begin
      pg_bin = begin
        require "tasker_core"
        TaskerCore::EmbeddedPostgres.bindir
      rescue StandardError, LoadError
        nil
      end
      sidekiq = Gem::Specification.find_all_by_name("sidekiq").max_by(&:version)
      msgpack_gem = Gem::Specification.find_all_by_name("msgpack").max_by(&:version)
      {
        "ruby" => RUBY_DESCRIPTION,
        "tasker_core" => (defined?(TaskerCore::VERSION) ? TaskerCore::VERSION : nil),
        "libzmq" => capture("pkg-config", "--modversion", "libzmq"),
        "msgpack_c" => capture("pkg-config", "--modversion", "msgpack"),
        "msgpack_gem" => msgpack_gem&.version&.to_s,
        "postgresql" => pg_bin && capture(File.join(pg_bin, "postgres"), "--version"),
        "redis" => capture("redis-server", "--version"),
        "sidekiq" => sidekiq&.version&.to_s,
        "good_job" => gem_in_bundle("goodjob", "good_job"),
        "rails" => gem_in_bundle("goodjob", "railties"),
        "solid_queue" => gem_in_bundle("solidqueue", "solid_queue"),
        "solid_queue_rails" => gem_in_bundle("solidqueue", "railties"),
        "cc" => capture("cc", "--version")&.lines&.first&.strip,
        "nproc" => Etc.nprocessors,
        "kernel" => capture("uname", "-sr"),
        "cpu" => File.read("/proc/cpuinfo")[/^model name\s*:\s*(.+)$/, 1],
        "loadavg_at_start" => File.read("/proc/loadavg").split[0, 3].join(" ")
      }
    end
  end

  # targets compare ours with a peer (ours / peer >= min_ratio); limits hold
  # one figure of one contender against an absolute bound ("max" or "min").
  # The version of gem locked in bench/<dir>/Gemfile.lock (a peer's own bundle).
  def gem_in_bundle(dir, gem)
    File.read(File.join(ROOT, "bench", dir, "Gemfile.lock"))[/^    #{Regexp.escape(gem)} \(([^)]+)\)/, 1]
  rescue Errno::ENOENT
    nil
  end

  def write_result(name, parameters:, rows:, targets: [], limits: nil, notes: nil)
    FileUtils.mkdir_p(RESULTS)
    env_now = env.merge("loadavg_at_end" => File.read("/proc/loadavg").split[0, 3].join(" "))
    doc = { "name" => name, "date" => Time.now.utc.iso8601, "env" => env_now, "parameters" => parameters,
            "targets" => targets, "rows" => rows }
    doc["limits"] = limits if limits
    doc["notes"] = notes if notes
    path = File.join(RESULTS, "#{name}.json")
    File.write(path, JSON.pretty_generate(doc) + "\n")
    puts "wrote #{path.sub("#{ROOT}/", '')}"
    path
  end

  def fmt(v)
    return "-" if v.nil?
    return format("%.3g", v) if v.abs < 10

    v.round.to_s.reverse.scan(/\d{1,3}/).join(",").reverse
  end

  def print_row(r)
    printf("  %-34s %-8s %-14s median %12s  [min %s, max %s] %s\n", r["label"], r["contender"], r["metric"],
           fmt(r["median"]), fmt(r["min"]), fmt(r["max"]), r["unit"])
  end

  # --- processes and CPU -------------------------------------------------

  # [ppid, utime+stime ticks, cutime+cstime ticks] of pid, or nil when gone.
  def proc_stat(pid)
    raw = File.read("/proc/#{pid}/stat")
    fields = raw[(raw.rindex(")") + 2)..].split
    # fields[0] is state (field 3); utime is field 14, so index 11
    [fields[1].to_i, fields[11].to_i + fields[12].to_i, fields[13].to_i + fields[14].to_i]
  rescue Errno::ENOENT, Errno::ESRCH, NoMethodError
    nil
  end

  def all_stats
    Dir.children("/proc").grep(/\A\d+\z/).each_with_object({}) do |d, h|
      s = proc_stat(d)
      h[d.to_i] = s if s
    end
  end

  # CPU seconds used so far by the trees under roots: each root's own time and
  # its reaped children's (cutime: a postmaster reaps its backends), plus the
  # same for every live descendant. Differences of two readings give the CPU
  # spent between them, also by processes that ended in between (their time
  # moved into their parent's cutime when reaped).
  def tree_cpu_s(roots)
    stats = all_stats
    children = Hash.new { |h, k| h[k] = [] }
    stats.each { |pid, (ppid, _, _)| children[ppid] << pid }
    seen = {}
    queue = roots.compact.select { |p| stats.key?(p) }
    total = 0
    until queue.empty?
      pid = queue.shift
      next if seen[pid]

      seen[pid] = true
      _, own, reaped = stats[pid]
      total += own + reaped
      queue.concat(children[pid])
    end
    total / CLK_TCK
  end

  # The live processes of the trees under roots (roots included).
  def tree_pids(roots)
    stats = all_stats
    children = Hash.new { |h, k| h[k] = [] }
    stats.each { |pid, (ppid, _, _)| children[ppid] << pid }
    queue = roots.compact.select { |p| stats.key?(p) }
    seen = []
    until queue.empty?
      pid = queue.shift
      next if seen.include?(pid)

      seen << pid
      queue.concat(children[pid])
    end
    seen
  end

  # A CPU profile of processes by sampling (`perf record -e cpu-clock`):
  # start it, run the work, then #finish summarises the samples per group
  # of processes ({ name => [pids] }): the share of each shared object and
  # the top symbols. Returns nil from #finish when perf is not there or
  # recorded nothing.
  class CpuProfile
    def initialize(groups, file: File.join(Dir.tmpdir, "tasker_bench_perf.#{Process.pid}.data"))
      @groups = groups
      @file = file
      pids = groups.values.flatten.uniq
      @pid = Process.spawn("perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-o", file, "-p", pids.join(","),
                           out: File::NULL, err: File::NULL)
    rescue SystemCallError
      @pid = nil
    end

    def finish(top: 12)
      return nil unless @pid

      # perf names samples by thread: each group's threads, read while
      # they still run.
      tids = @groups.transform_values { |pids| pids.flat_map { |p| threads_of(p) } }
      Process.kill("INT", @pid)
      Process.wait(@pid)
      by_tid = samples
      return nil if by_tid.empty?

      tids.to_h do |name, ids|
        rows = by_tid.values_at(*ids).compact.flatten(1)
        total = rows.sum { |r| r[:n] }.to_f
        [name, { "samples" => total.to_i,
                 "dso" => share(rows, total, top) { |r| r[:dso] },
                 "symbols" => share(rows, total, top) { |r| "#{r[:sym]} (#{r[:dso]})" } }]
      end
    ensure
      FileUtils.rm_f(@file)
    end

    private

    def threads_of(pid)
      Dir.children("/proc/#{pid}/task").map(&:to_i)
    rescue SystemCallError
      [pid]
    end

    def share(rows, total, top)
      rows.group_by { |r| yield r }.map { |k, rs| [k, (rs.sum { |r| r[:n] } * 100 / total).round(1)] }
          .sort_by { |_, pct| -pct }.first(top)
    end

    # { thread id => [{ dso:, sym:, n: }] } from `perf report`.
    def samples
      out = IO.popen(["perf", "report", "-i", @file, "--stdio", "-q", "--no-children", "-n", "--sort", "pid,dso,sym",
                      "--percent-limit", "0.05"], err: File::NULL, &:read)
      out.each_line.each_with_object(Hash.new { |h, k| h[k] = [] }) do |line, h|
        m = line.match(/\A\s*[\d.]+%\s+(\d+)\s+(\d+):.*?\s+(\S+)\s+\[[.kgu]\]\s+(.+?)\s*\z/) or next
        h[m[2].to_i] << { n: m[1].to_i, dso: File.basename(m[3]), sym: m[4] }
      end
    end
  end

  def rss_kb(pid)
    File.read("/proc/#{pid}/status")[/^VmRSS:\s+(\d+)/, 1].to_i
  rescue Errno::ENOENT
    nil
  end

  def hwm_kb(pid)
    File.read("/proc/#{pid}/status")[/^VmHWM:\s+(\d+)/, 1].to_i
  rescue Errno::ENOENT
    nil
  end

  def free_port
    require "socket"
    s = TCPServer.new("127.0.0.1", 0)
    s.addr[1]
  ensure
    s&.close
  end

  # Waits for the block to return truthy, polling; raises after timeout s.
  def wait_until(timeout, what, interval: 0.02)
    deadline = clock + timeout
    loop do
      v = yield
      return v if v
      raise "timed out after #{timeout}s waiting for #{what}" if clock > deadline

      sleep interval
    end
  end

  def stop_process(pid, signal = "TERM", timeout: 20)
    return unless pid

    Process.kill(signal, pid)
    deadline = clock + timeout
    loop do
      return if Process.waitpid(pid, Process::WNOHANG)
      if clock > deadline
        Process.kill("KILL", pid)
        Process.waitpid(pid)
        return
      end
      sleep 0.02
    end
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  end
end
