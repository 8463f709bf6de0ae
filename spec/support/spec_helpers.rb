# frozen_string_literal: true

require "rbconfig"

# Helpers shared by every spec: free ports, child processes that are always
# cleaned up, and waiting on a condition instead of sleeping a fixed time.
module SpecHelpers
  ROOT = File.expand_path("../..", __dir__)

  # A TCP port nobody listens on right now.
  def free_port = TaskerCore::Socket.free_tcp_port

  def tcp_endpoint
    "tcp://127.0.0.1:#{free_port}"
  end

  # Starts a Ruby child process running `script` (a string of Ruby) with the
  # gem on its load path; it is killed after the example if still alive.
  def spawn_ruby(script, *args, env: {}, out: :out, err: :err)
    pid = Process.spawn(env, RbConfig.ruby, "-I", File.join(ROOT, "lib"), "-e", script, "--", *args,
                        out: out, err: err, pgroup: true)
    (@spawned_pids ||= []) << pid
    pid
  end

  def kill_spawned
    (@spawned_pids || []).each do |pid|
      Process.kill(:KILL, -pid)
    rescue Errno::ESRCH, Errno::EPERM
      nil
    ensure
      begin
        Process.wait(pid)
      rescue Errno::ECHILD
        nil
      end
    end
    @spawned_pids = []
  end

  # Polls the block until it returns truthy; fails the example after timeout.
  def wait_until(timeout: 10, interval: 0.01, message: "condition")
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      result = yield
      return result if result
      raise "timed out after #{timeout}s waiting for #{message}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep interval
    end
  end

  # Counters are published just after what they count becomes visible (a
  # batch on the wire, a committed row): waits for the block's hash to
  # include `expected` (values or matchers), then asserts it does.
  def expect_counters(expected)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 10
    now = yield
    until expected.all? { |key, value| value === now[key] } || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      sleep 0.01
      now = yield
    end
    expect(now).to include(expected)
  end

  def self.included(base)
    base.after { kill_spawned } if base.respond_to?(:after)
  end
end
