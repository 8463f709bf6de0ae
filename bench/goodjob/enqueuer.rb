# frozen_string_literal: true

# The GoodJob side of the end-to-end benchmark's driver: creates GoodJob's
# tables (its install migration, once), then enqueues no-op jobs with
# GoodJob::Bulk on request (protocol: bench/lib/activejob_peer.rb).
#
#   cd bench/goodjob && BUNDLE_GEMFILE=Gemfile RUBYOPT=-rbundler/setup DATABASE_URL=... ruby enqueuer.rb
require_relative "config/environment"
require "erb"

unless ActiveRecord::Base.connection.table_exists?(:good_jobs)
  template = File.join(Gem.loaded_specs["good_job"].full_gem_path,
                       "lib/generators/good_job/templates/install/migrations/create_good_jobs.rb.erb")
  migration_version = "[#{ActiveRecord::VERSION::MAJOR}.#{ActiveRecord::VERSION::MINOR}]"
  eval(ERB.new(File.read(template)).result(binding), TOPLEVEL_BINDING, template) # rubocop:disable Security/Eval
  ActiveRecord::Migration.suppress_messages { CreateGoodJobs.migrate(:up) }
end
raise "GoodJob's schema is incomplete" unless GoodJob.migrated?

ActiveJobPeer.serve { |k| GoodJob::Bulk.enqueue { k.times { BenchNoopJob.perform_later } } }
