# frozen_string_literal: true

require_relative "boot"

require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "active_job/railtie"

# Loads tasker_core, whose Railtie reads config/tasker-config.yml, loads
# config/tasks/ and autoloads app/handlers/.
Bundler.require(*Rails.groups)

module RailsApp
  # An API-only app on PostgreSQL (config/database.yml; tasker_core uses the
  # same database through ActiveRecord's config): orders become tasker_core
  # tasks (TaskerCore.create_task), run by `bin/tasker worker` processes and
  # one `bin/tasker orchestrator`; the reserve step writes a Reservation.
  # OrderReceiptJob, an ActiveJob job, runs on tasker_core too.
  class Application < Rails::Application
    config.load_defaults 7.0
    config.api_only = true
    # ActiveJob jobs run as tasker_core tasks (app/jobs; the gem's docs/rails.md).
    config.active_job.queue_adapter = :tasker_core
  end
end
