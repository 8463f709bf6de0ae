# frozen_string_literal: true

require "bundler"
require "fileutils"
require "open3"

# tasker_core as a user gets it: `gem build` from the checkout's gemspec,
# then `gem install --local` of that .gem into an empty GEM_HOME (which
# compiles the C extension there); its dependencies come from the machine's
# gems, still visible through GEM_PATH. Used by `rake rails:fresh_app`
# (fresh_app/check.rb) and `rake examples` (examples.rake).
module BuiltGem
  ROOT = File.expand_path("..", __dir__)

  class Failure < StandardError; end

  module_function

  def version
    require_relative "../lib/tasker_core/version"
    TaskerCore::VERSION
  end

  # What a command needs to see gem_home first, then the machine's gems,
  # and gem_home's executables.
  def env(gem_home)
    { "GEM_HOME" => gem_home, "GEM_PATH" => [gem_home, *Gem.path].uniq.join(File::PATH_SEPARATOR),
      "PATH" => [File.join(gem_home, "bin"), ENV.fetch("PATH")].join(File::PATH_SEPARATOR) }
  end

  # Builds the .gem into dir and installs it into gem_home (emptied first);
  # returns the .gem's path. run.(env, *cmd, chdir:) runs each command and
  # raises when it fails (the default prints its output).
  def build_and_install(dir:, gem_home:, run: method(:run))
    FileUtils.rm_rf(gem_home)
    FileUtils.mkdir_p(dir)
    gem = File.join(dir, "tasker_core-#{version}.gem")
    run.call(env(gem_home), "gem", "build", File.join(ROOT, "tasker_core.gemspec"), "--output", gem, chdir: ROOT)
    run.call(env(gem_home), "gem", "install", "--local", "--no-document", gem, chdir: dir)
    installed = Dir[File.join(gem_home, "gems", "*")].map { |d| File.basename(d) }
    raise Failure, "#{gem_home} should hold only tasker_core-#{version}, has #{installed}" unless installed == ["tasker_core-#{version}"]

    gem
  end

  def run(env, *cmd, chdir:)
    out, status = Bundler.with_unbundled_env { Open3.capture2e(env, *cmd, chdir: chdir) }
    raise Failure, "`#{cmd.join(' ')}` failed (exit #{status.exitstatus}):\n#{out}" unless status.success?

    out
  end
end
