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
  # database (the app's, through ActiveRecord's config, unless database.url
  # or DATABASE_URL names another). Handlers run inside the app's reloader.
  # See docs/rails.md.
  class Railtie < ::Rails::Railtie
    config.tasker_core = ActiveSupport::OrderedOptions.new
    # A separate database for tasker_core's tables, as ActiveRecord's
    # connects_to takes it ({ database: { writing: :tasker } }); nil = the
    # app's primary database (ActiveRecord::Base).
    config.tasker_core.connects_to = nil
    # When TaskerCore.create_task runs on the app's ActiveRecord connection:
    # :in_transaction (inside an open transaction, so the task commits or
    # rolls back with it), :always, or :never (tasker_core's own pool).
    config.tasker_core.active_record_connection = :in_transaction

    initializer "tasker_core.environment", before: :load_config_initializers do
      ENV["TASKER_ENV"] ||= Rails.env.to_s
    end

    # config.active_job.queue_adapter = :tasker_core: ActiveJob looks the
    # adapter up by constant when ActiveJob::Base loads (at the latest in
    # the app's initializers).
    initializer "tasker_core.active_job", before: :load_config_initializers do
      require "active_job/queue_adapters/tasker_core_adapter" if defined?(::ActiveJob::Railtie)
    end

    initializer "tasker_core.logger", after: :initialize_logger do
      TaskerCore.logger = Rails.logger
    end

    # The app's database when database.url / DATABASE_URL name none
    # (TaskerCore::ActiveRecordDatabase, docs/rails.md).
    initializer "tasker_core.active_record" do |app|
      next unless defined?(::ActiveRecord::Railtie)

      options = app.config.tasker_core
      TaskerCore::ActiveRecordDatabase.connection_mode = options.active_record_connection || :in_transaction
      TaskerCore::Config.database_url_fallback = -> { TaskerCore::ActiveRecordDatabase.url }
      ActiveSupport.on_load(:active_record) do
        if options.connects_to
          unless TaskerCore.const_defined?(:Record, false)
            # tasker_core's own abstract class on that database, like SolidQueue::Record.
            record = Class.new(::ActiveRecord::Base) { self.abstract_class = true }
            TaskerCore.const_set(:Record, record)
            record.connects_to(**options.connects_to)
          end
          TaskerCore::ActiveRecordDatabase.record_class = TaskerCore::Record
        end
      end
    end

    # Each handler call runs inside the app's reloader (and so its executor),
    # as Sidekiq runs a job: ActiveRecord connections go back to the pool
    # after each step, and changed code reloads in development.
    config.after_initialize do |app|
      TaskerCore.handler_wrapper = TaskerCore::HandlerWrapper::RailsReloader.new(app) unless TaskerCore.handler_wrapper_set?
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
      TaskerCore::HandlerRegistry.default.forget_autoloaded!
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

          # db/structure.sql (schema_format :sql, set by the install
          # generator) gets tasker_schema_migrations' rows, as Rails adds
          # schema_migrations' (lib/tasker_core/structure_dump.rb).
          namespace :schema do
            task :dump do
              require_relative "structure_dump"
              TaskerCore::StructureDump.after_dump
            end
          end
        end
      end
    end

    generators do
      require_relative "../generators/tasker_core/install/install_generator"
    end
  end
end
