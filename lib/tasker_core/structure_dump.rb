# frozen_string_literal: true

module TaskerCore
  # tasker_core's schema has SQL functions, sequences and triggers that
  # db/schema.rb cannot hold, so the install generator sets
  # `config.active_record.schema_format = :sql`: Rails then dumps
  # db/structure.sql with pg_dump, which has all of it, and loads it with
  # psql (db:test:prepare, db:schema:load, db:prepare, maintain_test_schema!).
  #
  # pg_dump writes no rows. Rails appends its schema_migrations rows; this
  # appends tasker_schema_migrations' (the gem's SQL migrations the
  # database has), so a database loaded from the file is at the same gem
  # schema version, and `db:migrate` after a gem upgrade applies only the
  # gem's new SQL. The Railtie runs it after every `db:schema:dump`.
  module StructureDump
    MARKER = "-- tasker_core: the gem's SQL migrations this schema has (tasker_schema_migrations)"

    module_function

    # Appends the rows to the structure file at path when it holds
    # tasker_schema_migrations; true when it did.
    def append_migrations(path, connection)
      return false unless File.file?(path)

      text = File.read(path)
      return false if text.include?(MARKER) || !text.match?(/^CREATE TABLE (\w+\.)?tasker_schema_migrations\b/)

      rows = connection.select_rows("SELECT version, name FROM tasker_schema_migrations ORDER BY version")
      return false if rows.empty?

      values = rows.map { |version, name| "(#{Integer(version)}, #{connection.quote(name)})" }.join(",\n")
      File.open(path, "a") do |f|
        f.puts("", MARKER, "INSERT INTO tasker_schema_migrations (version, name) VALUES", "#{values};", "")
      end
      true
    end

    # After `db:schema:dump`: each database of the environment whose
    # schema is dumped as SQL.
    def after_dump
      return unless ActiveRecord.respond_to?(:schema_format) && ActiveRecord.schema_format == :sql

      tasks = ActiveRecord::Tasks::DatabaseTasks
      ActiveRecord::Base.configurations.configs_for(env_name: tasks.env).each do |db_config|
        next unless db_config.schema_dump

        path = tasks.schema_dump_path(db_config, :sql)
        next unless path && File.file?(path)

        ActiveRecord::Base.establish_connection(db_config)
        append_migrations(path, ActiveRecord::Base.connection)
      end
    end
  end
end
