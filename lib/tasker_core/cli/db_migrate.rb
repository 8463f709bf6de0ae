# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker db:migrate
    class DbMigrate < Command
      DESCRIPTION = "Applies the schema migrations the database lacks (safe to run again)."

      private

      def call(_args)
        url = database_url!
        applied = Store.migrate!(url)
        if applied.empty?
          out.puts "database schema is up to date (version #{Store::Migrator.latest_version})"
        else
          out.puts "applied migration#{'s' if applied.size > 1} #{applied.join(', ')}"
        end
        EXIT_OK
      end
    end
  end
end
