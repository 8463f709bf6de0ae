# frozen_string_literal: true

# rake examples: the example Rails app's spec (examples/rails_app), with the
# app's own bundle. Its locked gems are installed with `gem install` when
# missing, as bin/setup does for the main Gemfile (no gem server is named).
EXAMPLE_APP = File.expand_path("../examples/rails_app", __dir__)

namespace :examples do
  desc "Install examples/rails_app's locked gems that are missing"
  task :gems do
    require "bundler"
    require "open3"
    lock = Bundler::LockfileParser.new(File.read(File.join(EXAMPLE_APP, "Gemfile.lock")))
    wanted = lock.specs.reject { |s| s.source.is_a?(Bundler::Source::Path) }
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
    sh({ "BUNDLE_GEMFILE" => File.join(EXAMPLE_APP, "Gemfile") }, "bundle", "check")
  end
end

desc "Run the example Rails app's spec (boots it, creates a task over HTTP, completes it through a worker)"
task examples: %i[compile examples:gems] do
  sh({ "BUNDLE_GEMFILE" => File.join(EXAMPLE_APP, "Gemfile") },
     "bundle", "exec", "rspec", "--default-path", "examples/rails_app/spec", "examples/rails_app/spec")
end
