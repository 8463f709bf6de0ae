# frozen_string_literal: true

require "rails/generators"
# Only an app that loads ActiveRecord gets the Rails migration; the others
# apply the schema with `bin/tasker db:migrate` (or `rails tasker:migrate`).
require "rails/generators/active_record" if defined?(::ActiveRecord::Railtie)

module TaskerCore
  module Generators
    # rails generate tasker_core:install
    #
    # Writes config/tasker-config.yml, an example template and handler, a
    # bin/tasker binstub, and a Rails migration that applies the gem's SQL
    # migrations (TaskerCore::Store.migrate!). The schema goes through a Rails
    # migration so that `rails db:migrate` in deploys and CI applies it in the
    # order the app expects, with no second command to forget; the SQL itself
    # stays in the gem (db/migrate/*.sql), versioned in
    # tasker_schema_migrations, so a gem upgrade ships new SQL and a new
    # generated migration (or `rails tasker:migrate`) applies it.
    class InstallGenerator < ::Rails::Generators::Base
      include ::ActiveRecord::Generators::Migration if defined?(::ActiveRecord::Generators::Migration)

      source_root File.expand_path("templates", __dir__)

      def config_file
        template "tasker-config.yml.tt", "config/tasker-config.yml"
      end

      def example_template
        template "example_task.yml.tt", "config/tasks/example_task.yml"
      end

      def example_handler
        template "example_handler.rb.tt", "app/handlers/example_handler.rb"
      end

      def binstub
        template "tasker.tt", "bin/tasker"
        chmod "bin/tasker", 0o755
      end

      def migration
        unless defined?(::ActiveRecord::Railtie)
          say "No ActiveRecord in this app: apply tasker_core's schema with `bin/tasker db:migrate` " \
              "(or `bin/rails tasker:migrate`).", :yellow
          return
        end

        if respond_to?(:migration_template, true)
          migration_template "migration.rb.tt", "db/migrate/install_tasker_core.rb"
        else
          template "migration.rb.tt", "db/migrate/#{Time.now.utc.strftime('%Y%m%d%H%M%S')}_install_tasker_core.rb"
        end
      end

      private

      # The discovery name suggested in the config: the app's module, underscored.
      def app_name
        ::Rails.application ? ::Rails.application.class.module_parent_name.underscore : "my_app"
      end

      def migration_version = "[#{::ActiveRecord::VERSION::MAJOR}.#{::ActiveRecord::VERSION::MINOR}]"
    end
  end
end
