# frozen_string_literal: true

# The GoodJob side of the end-to-end benchmark's driver: creates GoodJob's
# tables (its install migration, once) and enqueues no-op jobs in bulk.
# Protocol with bench/lib/e2e.rb, on stdin/stdout:
#   prints "ready" once the app is up and the schema is in place;
#   "enqueue N" enqueues N jobs with GoodJob::Bulk, 1,000 per INSERT
#   (each its own transaction, as Sidekiq's push_bulk slices), then prints "enqueued";
#   end of stdin exits.
#
#   cd bench/goodjob && BUNDLE_GEMFILE=Gemfile DATABASE_URL=... bundle exec ruby enqueuer.rb
require_relative "config/environment"
require "erb"

$stdout.sync = true
unless ActiveRecord::Base.connection.table_exists?(:good_jobs)
  template = File.join(Gem.loaded_specs["good_job"].full_gem_path,
                       "lib/generators/good_job/templates/install/migrations/create_good_jobs.rb.erb")
  migration_version = "[#{ActiveRecord::VERSION::MAJOR}.#{ActiveRecord::VERSION::MINOR}]"
  eval(ERB.new(File.read(template)).result(binding), TOPLEVEL_BINDING, template) # rubocop:disable Security/Eval
  ActiveRecord::Migration.suppress_messages { CreateGoodJobs.migrate(:up) }
end
raise "GoodJob's schema is incomplete" unless GoodJob.migrated?

puts "ready"
while (line = $stdin.gets)
  cmd, n = line.split
  next unless cmd == "enqueue"

  left = Integer(n)
  while left.positive?
    k = [left, 1000].min
    GoodJob::Bulk.enqueue { k.times { BenchNoopJob.perform_later } }
    left -= k
  end
  puts "enqueued"
end
