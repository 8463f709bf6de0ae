# frozen_string_literal: true

# rake examples: the example Rails app's spec (examples/rails_app), with the
# app's own bundle and tasker_core as a user installs it: the .gem built
# from this checkout and installed into tmp/examples/gem_home (the machine's
# other gems still visible through GEM_PATH); the app's Gemfile names it by
# version. The app's other locked gems are installed with `gem install`
# when missing, as bin/setup does for the main Gemfile (no gem server is
# named).
EXAMPLE_APP = File.expand_path("../examples/rails_app", __dir__)
EXAMPLES_DIR = File.expand_path("../tmp/examples", __dir__)
EXAMPLES_GEM_HOME = File.join(EXAMPLES_DIR, "gem_home")

namespace :examples do
  desc "Install examples/rails_app's locked gems that are missing (all but tasker_core)"
  task :gems do
    require "bundler"
    require "open3"
    lock = Bundler::LockfileParser.new(File.read(File.join(EXAMPLE_APP, "Gemfile.lock")))
    wanted = lock.specs.reject { |s| s.name == "tasker_core" }
    # Asked of a plain Ruby: under `bundle exec` only the checkout's bundle is visible.
    script = 'STDIN.each_line { |l| n, v = l.split; puts n if Gem::Specification.find_all_by_name(n, "= #{v}").empty? }'
    out, status = Bundler.with_unbundled_env do
      Open3.capture2(RbConfig.ruby, "-e", script, stdin_data: wanted.map { |s| "#{s.name} #{s.version}\n" }.join)
    end
    raise "could not list the installed gems" unless status.success?

    missing_names = out.split
    missing = wanted.select { |s| missing_names.include?(s.name) }
    # The lock lists every gem: install exactly those, no newer dependency.
    # --force: Rack 2 ships a `rackup` executable that the main bundle's
    # rackup 2 (for Rack 3) also installs; both gem versions stay installed.
    missing.each { |s| sh "gem", "install", "--no-document", "--ignore-dependencies", "--force", s.name, "-v", s.version.to_s }
  end

  desc "Build tasker_core's .gem and install it into tmp/examples/gem_home"
  task :gem do
    require_relative "built_gem"
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    BuiltGem.build_and_install(dir: EXAMPLES_DIR, gem_home: EXAMPLES_GEM_HOME)
    puts format("examples: tasker_core-%s built and installed into %s in %.0f s",
                BuiltGem.version, EXAMPLES_GEM_HOME, Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
  end
end

desc "Run the example Rails app's spec against the built gem (boots it, creates a task over HTTP, completes it through a worker)"
task examples: %i[examples:gems examples:gem] do
  require "bundler"
  require_relative "built_gem"
  # The app's bundle only (nothing of the checkout's: no RUBYOPT=-rbundler/setup, no BUNDLE_PATH),
  # run in the app's directory (rspec puts ./lib on the load path: not the checkout's).
  env = BuiltGem.env(EXAMPLES_GEM_HOME).merge("BUNDLE_GEMFILE" => File.join(EXAMPLE_APP, "Gemfile"))
  Bundler.with_unbundled_env do
    sh env, "bundle", "check", chdir: EXAMPLE_APP
    sh env, "bundle", "exec", "rspec", "--default-path", "spec", "spec", chdir: EXAMPLE_APP
  end
end
