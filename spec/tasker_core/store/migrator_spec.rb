# frozen_string_literal: true

RSpec.describe TaskerCore::Store::Migrator do
  let(:conn) { connect }

  it "is idempotent and records the version" do
    expect(TaskerCore::Store.migrate!(db_url)).to eq([]) # the suite migrated already
    versions = conn.exec("SELECT version FROM tasker_schema_migrations ORDER BY version").map { |r| r["version"] }
    expect(versions).to eq(described_class.migrations.map(&:version))
    expect(described_class.new(conn).current_version).to eq(described_class.latest_version)
  end

  it "applies every migration to an empty database" do
    conn.transaction do
      conn.exec("CREATE SCHEMA tasker_migrate_spec")
      conn.exec("SET LOCAL search_path TO tasker_migrate_spec")
      expect(described_class.new(conn).migrate!).to eq(described_class.migrations.map(&:version))
      tables = conn.exec("SELECT tablename FROM pg_tables WHERE schemaname = 'tasker_migrate_spec'").map { |r| r["tablename"] }
      expect(tables).to include("tasker_tasks", "tasker_workflow_steps", "tasker_workflow_step_edges",
                                "tasker_task_transitions", "tasker_workflow_step_transitions", "tasker_schema_migrations", "tasker_workers",
                                "tasker_orchestrators")
      conn.exec("ROLLBACK") # leave nothing behind (the block sees an aborted transaction as closed)
    end
  end

  it "refuses a database whose schema is newer than the gem" do
    conn.transaction do
      conn.exec("INSERT INTO tasker_schema_migrations (version, name) VALUES (9999, 'future')")
      expect { described_class.new(conn).migrate! }
        .to raise_error(TaskerCore::StoreError, /version 9999, newer than this gem knows/)
      conn.exec("ROLLBACK")
    end
  end
end
