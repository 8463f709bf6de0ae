# frozen_string_literal: true

# The example app's specs run with the app's bundle, in the app's directory,
# tasker_core installed from its built .gem (rake examples, rakelib/examples.rake):
#   GEM_HOME=... GEM_PATH=... bundle exec rspec --default-path spec spec
# They drive the app as separate processes (rails server, bin/tasker) and
# load only tasker_core itself here, for the embedded PostgreSQL.
require "tasker_core"
require "tmpdir"
require "fileutils"
require "socket"
require "open3"
require "pty"
require "uri"

module RailsAppHelpers
  APP_ROOT = File.expand_path("..", __dir__)
  GEM_ROOT = File.expand_path("../../..", __dir__)

  PIDS = []  # every process spawned, stopped by stop_all / reap_all

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def wait_until(timeout: 30, message: "condition")
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      result = yield
      return result if result
      raise "timed out after #{timeout}s waiting for #{message}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.05
    end
  end

  # A process in the app's directory with the app's bundle; its output goes
  # to log (read it when a wait times out).
  def spawn_app(env, *cmd, log:, chdir: APP_ROOT)
    pid = Process.spawn(app_env(chdir).merge(env), *cmd, chdir: chdir, out: log, err: log, pgroup: true)
    PIDS << pid
    pid
  end

  # A process whose stdout and stderr are a terminal (a pty), copied to log.
  def spawn_tty(env, *cmd, log:, chdir: APP_ROOT)
    master, slave = PTY.open
    pid = Process.spawn(app_env(chdir).merge(env), *cmd, chdir: chdir, in: slave, out: slave, err: slave, pgroup: true)
    slave.close
    PIDS << pid
    Thread.new do
      File.open(log, "a") do |f|
        f.sync = true
        IO.copy_stream(master, f)
      rescue Errno::EIO # the process exited
        nil
      end
    end
    pid
  end

  def run_app(env, *cmd, chdir: APP_ROOT)
    Open3.capture2e(app_env(chdir).merge(env), *cmd, chdir: chdir)
  end

  def app_env(dir)
    { "BUNDLE_GEMFILE" => File.join(dir, "Gemfile"), "RAILS_ENV" => "test", "TASKER_ENV" => "test" }
  end

  def stop_all(signal = :TERM)
    PIDS.each do |pid|
      Process.kill(signal, -pid)
    rescue Errno::ESRCH
      nil
    end
  end

  def reap_all(timeout: 15)
    PIDS.each do |pid|
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      until Process.wait(pid, Process::WNOHANG)
        if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
          Process.kill(:KILL, -pid)
          Process.wait(pid)
          break
        end
        sleep 0.05
      end
    rescue Errno::ECHILD, Errno::ESRCH
      nil
    end
    PIDS.clear
  end
end

RSpec.configure do |config|
  config.include RailsAppHelpers
  config.disable_monkey_patching!
end
