# frozen_string_literal: true

# rake rails:fresh_app: the gem as a new Rails team gets it (rakelib/fresh_app/check.rb):
# `gem build`, installed into an empty GEM_HOME, a `rails new --database=postgresql` app with
# its config/database.yml, the install generator, migrations, the test database, rspec and a
# task through `bin/tasker orchestrator` and `bin/tasker worker`. Run by bin/test.
namespace :rails do
  desc "Check the built gem in a fresh Rails app: generator, db tasks, rspec kit, orchestrator and worker"
  task fresh_app: :compile do
    require_relative "../lib/tasker_core"
    require_relative "fresh_app/check"
    begin
      FreshAppCheck.new(root: File.expand_path("..", __dir__)).run
    rescue FreshAppCheck::Failure => e
      abort "rails:fresh_app failed: #{e.message}"
    end
  end
end
