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

  describe "TaskerCore::Store.migrate_if_installed! (what `rails db:migrate` runs)" do
    def fresh_database(name)
      conn.exec("DROP DATABASE IF EXISTS #{name}")
      conn.exec("CREATE DATABASE #{name}")
      db_url.sub(%r{/[^/]*\z}, "/#{name}")
    end

    after do
      close_db_connections
      %w[tasker_upgrade_spec tasker_bare_spec tasker_live_upgrade_spec].each do |n|
        connect.exec("DROP DATABASE IF EXISTS #{n}")
      end
    end

    # The schema at version, from a copy of the migrations up to it.
    def migrate_to(url, version)
      Dir.mktmpdir do |dir|
        described_class.migrations.select { |m| m.version <= version }.each { |m| FileUtils.cp(m.path, dir) }
        described_class.new(connect(url), dir: dir).migrate!
      end
    end

    it "applies a newer gem's migrations to an installed schema" do
      url = fresh_database("tasker_upgrade_spec")
      migrate_to(url, described_class.latest_version - 1)
      expect(TaskerCore::Store.migrate_if_installed!(url)).to eq([described_class.latest_version])
      expect(TaskerCore::Store.migrate_if_installed!(url)).to eq([])
    end

    it "keeps the ready steps' index in use by connections open while 0016 changes its expression's function" do
      url = fresh_database("tasker_live_upgrade_spec")
      migrate_to(url, 15)
      orchestrator = connect(url) # a long-lived session, as an orchestrator's
      orchestrator.exec("SET enable_seqscan = off")
      ready = lambda do
        orchestrator.exec(<<~SQL).map { |r| r["QUERY PLAN"] }.join("\n")
          EXPLAIN SELECT s.id FROM tasker_workflow_steps s
           WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.queue = 'default'
             AND tasker_claim_order(s.next_attempt_at, s.priority) <= now() + interval '100 seconds'
           ORDER BY tasker_claim_order(s.next_attempt_at, s.priority), s.id LIMIT 10
        SQL
      end
      index_scan = /Index Scan using tasker_workflow_steps_queue_ready.*\n\s+Index Cond: .*next_attempt_at/
      expect(ready.call).to match(index_scan) # the session has read the index's expression

      expect(TaskerCore::Store.migrate_if_installed!(url)).to eq((16..described_class.latest_version).to_a)
      # With the index's cached expression still the function call, the
      # inlined query no longer matches it: a scan of every ready step of
      # the queue and a sort.
      expect(ready.call).to match(index_scan)
    end

    it "leaves a database without tasker_core's schema alone" do
      url = fresh_database("tasker_bare_spec")
      expect(TaskerCore::Store.migrate_if_installed!(url)).to be_nil
      expect(connect(url).exec("SELECT to_regclass('tasker_tasks') AS t").first["t"]).to be_nil
    end
  end
end
