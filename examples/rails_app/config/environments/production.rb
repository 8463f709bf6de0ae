# frozen_string_literal: true

Rails.application.configure do
  config.cache_classes = true
  config.eager_load = true
  config.consider_all_requests_local = false
  config.log_level = :info
  config.log_tags = [:request_id]
  config.active_support.report_deprecations = false
  config.logger = ActiveSupport::TaggedLogging.new(ActiveSupport::Logger.new($stdout)) if ENV["RAILS_LOG_TO_STDOUT"].present?
end
