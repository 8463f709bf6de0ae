# frozen_string_literal: true

require "tmpdir"
require "fileutils"

# A real PostgreSQL for the store specs: DATABASE_URL when set, otherwise an
# embedded cluster started once per run in a temp dir (stopped at exit).
# The schema is migrated once; examples tagged :db start from empty tables.
module DatabaseHelpers
  TABLES = %w[tasker_workflow_step_transitions tasker_task_transitions tasker_workflow_step_edges
              tasker_workflow_steps tasker_tasks tasker_task_templates tasker_workers
              tasker_recurring_schedules].freeze

  class << self
    attr_reader :pg_dir

    def url
      @url ||= if ENV["DATABASE_URL"] && !ENV["DATABASE_URL"].empty?
                 ENV["DATABASE_URL"]
               else
                 @pg_dir = Dir.mktmpdir("tasker_pg")
                 File.chmod(0o755, @pg_dir)
                 at_exit { stop }
                 TaskerCore::EmbeddedPostgres.start(dir: @pg_dir, database: "tasker_test")
               end
    end

    def migrated_url
      @migrated_url ||= url.tap { |u| TaskerCore::Store.migrate!(u) }
    end

    def stop
      return unless @pg_dir

      TaskerCore::EmbeddedPostgres.stop(dir: @pg_dir)
      FileUtils.rm_rf(@pg_dir)
    end
  end

  def db_url = DatabaseHelpers.migrated_url

  def connect(url = db_url) = TaskerCore::Store::Connection.new(url, connect_timeout: 5).tap { |c| (@db_conns ||= []) << c }

  def close_db_connections
    (@db_conns || []).each { |c| c.close if c.owner_pid == Process.pid && !c.closed? }
    @db_conns = []
  end

  def truncate_tables
    TaskerCore::Store.with_connection do |c|
      c.exec("TRUNCATE #{TABLES.join(', ')} RESTART IDENTITY CASCADE")
    end
  end
end

RSpec.configure do |config|
  config.include DatabaseHelpers
  config.after do
    close_db_connections
    TaskerCore.reset_config! # templates and the store read the config; leave none memoized
  end
  config.before(:each, :db) do
    TaskerCore::Store.pool = TaskerCore::Store::Pool.new(url: db_url, size: 4, connect_timeout: 5) unless
      TaskerCore::Store.instance_variable_get(:@pool)&.url == db_url
    truncate_tables
  end
end
