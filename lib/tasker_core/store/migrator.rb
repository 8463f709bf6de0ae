# frozen_string_literal: true

module TaskerCore
  module Store
    # Applies the versioned SQL files shipped in db/migrate (NNNN_name.sql)
    # that a database has not seen yet, each recorded in
    # tasker_schema_migrations, all in one transaction under an advisory lock
    # (so two processes migrating at once do it once). Refuses a database
    # whose recorded version is newer than this gem knows.
    class Migrator
      DIR = File.expand_path("../../../db/migrate", __dir__)
      # pg_advisory_xact_lock key: "tasker" in ASCII
      LOCK_KEY = 0x7461736b6572

      Migration = Struct.new(:version, :name, :path)

      def self.migrations(dir = DIR)
        Dir[File.join(dir, "*.sql")].sort.map do |path|
          m = File.basename(path).match(/\A(\d+)_(\w+)\.sql\z/) or
            raise StoreError, "migration file #{path} is not named NNNN_name.sql"
          Migration.new(m[1].to_i, m[2], path)
        end
      end

      def self.latest_version = migrations.map(&:version).max || 0

      def initialize(connection, dir: DIR)
        @conn = connection
        @migrations = self.class.migrations(dir)
      end

      # Returns the versions applied now ([] when the database was up to date).
      def migrate!
        @conn.transaction do
          @conn.exec("SELECT pg_advisory_xact_lock($1)", [LOCK_KEY])
          @conn.exec(<<~SQL)
            CREATE TABLE IF NOT EXISTS tasker_schema_migrations (
              version    bigint PRIMARY KEY,
              name       text NOT NULL,
              applied_at timestamptz NOT NULL DEFAULT now()
            )
          SQL
          applied = @conn.exec("SELECT version FROM tasker_schema_migrations").map { |r| r["version"] }
          check_not_newer!(applied)
          pending = @migrations.reject { |m| applied.include?(m.version) }
          pending.each do |m|
            @conn.exec_script(File.read(m.path))
            @conn.exec("INSERT INTO tasker_schema_migrations (version, name) VALUES ($1, $2)", [m.version, m.name])
          end
          pending.map(&:version)
        end
      end

      # The highest version recorded in the database (0 when none).
      def current_version
        table = @conn.exec("SELECT to_regclass('tasker_schema_migrations') AS t").first["t"]
        return 0 unless table

        @conn.exec("SELECT coalesce(max(version), 0) AS v FROM tasker_schema_migrations").first["v"]
      end

      private

      def check_not_newer!(applied)
        known = @migrations.map(&:version).max || 0
        newest = applied.max || 0
        return if newest <= known

        raise StoreError, "the database's tasker_core schema is version #{newest}, newer than this gem knows " \
                          "(#{known}, tasker_core #{TaskerCore::VERSION}): upgrade the gem rather than run it " \
                          "against this database"
      end
    end
  end
end
