# frozen_string_literal: true

# The Solid Queue side of the end-to-end benchmark's driver: creates Solid
# Queue's tables (its generator's db/queue_schema.rb, once), then enqueues
# no-op jobs with ActiveJob.perform_all_later on request (protocol:
# bench/lib/activejob_peer.rb).
#
#   cd bench/solidqueue && BUNDLE_GEMFILE=Gemfile RUBYOPT=-rbundler/setup DATABASE_URL=... ruby enqueuer.rb
require_relative "config/environment"

unless ActiveRecord::Base.connection.table_exists?(:solid_queue_jobs)
  schema = File.join(Gem.loaded_specs["solid_queue"].full_gem_path,
                     "lib/generators/solid_queue/install/templates/db/queue_schema.rb")
  ActiveRecord::Migration.suppress_messages { load schema }
end

ActiveJobPeer.serve { |k| ActiveJob.perform_all_later(Array.new(k) { BenchNoopJob.new }) }
