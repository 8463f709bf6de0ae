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
    # bin/tasker binstub, `config.active_record.schema_format = :sql` in
    # config/application.rb, and a Rails migration that applies the gem's SQL
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

      # tasker_core's schema has SQL functions and sequences that
      # db/schema.rb cannot express: keep the app's schema in
      # db/structure.sql (pg_dump), which db:test:prepare, db:schema:load,
      # db:prepare and maintain_test_schema! then load whole.
      def schema_format
        return unless defined?(::ActiveRecord::Railtie)

        application_rb = File.join(destination_root, "config", "application.rb")
        if File.file?(application_rb) && File.read(application_rb).match?(/^\s*config\.active_record\.schema_format\s*=/)
          say "config/application.rb sets config.active_record.schema_format already: tasker_core's schema " \
              "(SQL functions, sequences) needs :sql (db/structure.sql).", :yellow
          return
        end

        application <<~RUBY
          # tasker_core's schema has SQL functions and sequences that db/schema.rb
          # cannot hold: the schema is db/structure.sql (pg_dump).
          config.active_record.schema_format = :sql
        RUBY
        return unless File.file?(File.join(destination_root, "db", "schema.rb"))

        say "db/schema.rb is no longer used (the schema is now db/structure.sql, written by the next " \
            "`bin/rails db:migrate`): delete it.", :yellow
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
