# frozen_string_literal: true

module TaskerCore
  # Loaded only under Rails (lib/tasker_core.rb requires it when
  # Rails::Railtie is defined). The configuration is the app's
  # config/tasker-config.yml read with Rails.env (Config.load finds it under
  # Rails.root); task templates come from config/tasks (tasks.template_dir);
  # handlers live in app/handlers, which Rails autoloads (Zeitwerk), and the
  # worker's handler registry resolves them by constant name; the gem logs
  # through Rails.logger.
  #
  # An app process that only creates tasks opens no socket: it needs only the
  # database. See docs/rails.md for running the orchestrator inside Puma
  # (on_worker_boot) and the worker (bin/tasker worker).
  class Railtie < ::Rails::Railtie
    config.tasker_core = ActiveSupport::OrderedOptions.new

    initializer "tasker_core.environment", before: :load_config_initializers do
      ENV["TASKER_ENV"] ||= Rails.env.to_s
    end

    initializer "tasker_core.logger", after: :initialize_logger do
      TaskerCore.logger = Rails.logger
    end

    initializer "tasker_core.handlers", before: :set_autoload_paths do |app|
      handlers = app.root.join("app", "handlers")
      app.config.eager_load_paths << handlers.to_s if handlers.directory? && !app.config.eager_load_paths.include?(handlers.to_s)
    end

    # Templates name handler classes; check them once the autoloader is ready,
    # and reload both with the code in development.
    config.to_prepare do
      TaskerCore.reset_config! if TaskerCore.respond_to?(:reset_config!)
      TaskerCore.task_templates = nil
    end

    rake_tasks do
      namespace :tasker do
        desc "Apply tasker_core's schema to the configured database"
        task migrate: :environment do
          versions = TaskerCore::Store.migrate!
          puts versions.empty? ? "tasker_core schema up to date" : "applied tasker_core migrations #{versions.join(', ')}"
        end
      end

      # The generated install migration runs once; a later gem version's SQL
      # (db/migrate/*.sql) reaches the app through its usual `rails db:migrate`
      # too: once the schema is installed, db:migrate also applies the gem's
      # pending migrations.
      if defined?(::ActiveRecord::Railtie)
        namespace :db do
          task migrate: :environment do
            versions = TaskerCore::Store.migrate_if_installed!
            puts "applied tasker_core migrations #{versions.join(', ')}" if versions&.any?
          end
        end
      end
    end

    generators do
      require_relative "../generators/tasker_core/install/install_generator"
    end
  end
end
