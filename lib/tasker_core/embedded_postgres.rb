# frozen_string_literal: true

require "fileutils"
require "open3"
require "socket"
require_relative "errors"

module TaskerCore
  # A private PostgreSQL cluster for development, tests and demos, started
  # from the system's server programs (Debian: package postgresql, under
  # `pg_config --bindir`). The tooling uses it when neither DATABASE_URL
  # nor database.url is set.
  #
  #   url = TaskerCore::EmbeddedPostgres.start                  # tmp/postgres, database tasker_<env>
  #   url = TaskerCore::EmbeddedPostgres.start(dir: "/tmp/pg", database: "tasker_test")
  #   TaskerCore::EmbeddedPostgres.stop(dir: "/tmp/pg")
  #
  # Layout of dir: data/ (the cluster), run/ (its Unix socket), port (the
  # TCP port on 127.0.0.1 it listens on), postgres.log. start is idempotent:
  # a cluster that is already running is reused, on its recorded port.
  # As root (initdb and postgres refuse to run as root), the programs run
  # through `runuser -u postgres --` and dir is chowned to that user.
  module EmbeddedPostgres
    SERVER_USER = "postgres"
    PROGRAMS = %w[initdb pg_ctl postgres].freeze

    class << self
      def default_dir
        File.join(Dir.pwd, "tmp", "postgres")
      end

      # Starts (or finds running) the cluster in dir and returns a URL for
      # database, which is created when missing.
      def start(dir: default_dir, database: nil)
        dir = File.expand_path(dir)
        database ||= "tasker_#{environment}"
        FileUtils.mkdir_p(dir)
        port = with_lock(dir) do
          prepare_dir(dir)
          init(dir) unless File.file?(File.join(dir, "data", "PG_VERSION"))
          running_port(dir) || launch(dir)
        end
        create_database(port, database)
        url(port, database)
      end

      # Stops the cluster in dir (fast shutdown); does nothing if it is not running.
      def stop(dir: default_dir)
        dir = File.expand_path(dir)
        return false unless File.file?(File.join(dir, "data", "PG_VERSION"))

        with_lock(dir) do
          next false unless running_port(dir)

          run!(pg_ctl, "stop", "-D", data_dir(dir), "-m", "fast", "-w", "-t", "60")
          true
        end
      end

      def running?(dir: default_dir)
        !running_port(File.expand_path(dir)).nil?
      end

      def url(port, database)
        "postgresql://#{SERVER_USER}@127.0.0.1:#{port}/#{database}"
      end

      # Folder with initdb, pg_ctl and postgres.
      def bindir
        @bindir ||= begin
          candidates = []
          out, status = begin
            Open3.capture2("pg_config", "--bindir")
          rescue SystemCallError
            [nil, nil]
          end
          candidates << out.strip if status&.success?
          candidates.concat(Dir["/usr/lib/postgresql/*/bin"].sort_by { |d| d[%r{/(\d+)/bin\z}, 1].to_i }.reverse)
          candidates.concat(ENV.fetch("PATH", "").split(File::PATH_SEPARATOR))
          found = candidates.find { |d| PROGRAMS.all? { |p| File.executable?(File.join(d, p)) } }
          found or raise StoreError,
                         "PostgreSQL's server programs (#{PROGRAMS.join(', ')}) were not found (looked in " \
                         "`pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH): install the postgresql " \
                         "package (Debian/Ubuntu: apt-get install postgresql; Homebrew: brew install postgresql), " \
                         "or set DATABASE_URL to use an existing server"
        end
      end

      private

      def environment
        TaskerCore.respond_to?(:config) ? TaskerCore.config.environment : "development"
      rescue Error
        "development"
      end

      def data_dir(dir) = File.join(dir, "data")
      def run_dir(dir) = File.join(dir, "run")
      def port_file(dir) = File.join(dir, "port")
      def pg_ctl = File.join(bindir, "pg_ctl")

      def as_root? = Process.uid.zero?

      # One process at a time sets up or starts a given cluster.
      def with_lock(dir)
        File.open(File.join(dir, "lock"), File::RDWR | File::CREAT, 0o644) do |f|
          f.flock(File::LOCK_EX)
          yield
        end
      end

      def prepare_dir(dir)
        FileUtils.mkdir_p([data_dir(dir), run_dir(dir)])
        FileUtils.chmod(0o700, data_dir(dir))
        return unless as_root?

        FileUtils.chown_R(SERVER_USER, nil, [data_dir(dir), run_dir(dir)])
        FileUtils.chown(SERVER_USER, nil, dir)
        File.chmod(File.stat(dir).mode | 0o755, dir)
        # the server user must be able to reach dir
        parent = File.dirname(dir)
        until parent == "/"
          mode = File.stat(parent).mode
          File.chmod(mode | 0o711, parent) if (mode & 0o001).zero? && File.owned?(parent)
          parent = File.dirname(parent)
        end
      rescue ArgumentError => e
        raise StoreError, "cannot run the embedded PostgreSQL as root: no #{SERVER_USER} user (#{e.message})"
      end

      def init(dir)
        run!(File.join(bindir, "initdb"), "-D", data_dir(dir), "-A", "trust", "-U", SERVER_USER, "-E", "UTF8",
             "--locale=C", "--no-instructions")
      end

      # The port of the running cluster in dir, or nil.
      def running_port(dir)
        pid_file = File.join(data_dir(dir), "postmaster.pid")
        return nil unless File.file?(pid_file)

        _out, status = capture(pg_ctl, "status", "-D", data_dir(dir))
        return nil unless status.success?

        # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, ...
        File.readlines(pid_file)[3]&.strip&.to_i
      end

      def launch(dir)
        port = File.file?(port_file(dir)) ? File.read(port_file(dir)).to_i : 0
        port = TaskerCore::Socket.free_tcp_port unless port.positive? && port_free?(port)
        File.write(port_file(dir), "#{port}\n")
        opts = "-c listen_addresses=127.0.0.1 -c port=#{port} -c unix_socket_directories='#{run_dir(dir)}' " \
               "-c fsync=on -c max_connections=100"
        run!(pg_ctl, "start", "-D", data_dir(dir), "-l", File.join(dir, "postgres.log"), "-w", "-t", "60",
             "-o", opts)
        port
      end

      def port_free?(port)
        TCPServer.new("127.0.0.1", port).close
        true
      rescue SystemCallError
        false
      end

      def create_database(port, database)
        require_relative "store/connection"
        conn = Store::Connection.new(url(port, "postgres"), connect_timeout: 10)
        exists = conn.exec("SELECT 1 FROM pg_database WHERE datname = $1", [database]).any?
        conn.exec(%(CREATE DATABASE "#{database.gsub('"', '""')}")) unless exists
      rescue StoreError => e
        raise unless e.sqlstate == "42P04" # created meanwhile by another process
      ensure
        conn&.close
      end

      def command(*cmd)
        as_root? ? ["runuser", "-u", SERVER_USER, "--", *cmd] : cmd
      end

      def capture(*cmd)
        Open3.capture2e(*command(*cmd), chdir: "/")
      end

      def run!(*cmd)
        out, status = capture(*cmd)
        return out if status.success?

        raise StoreError, "embedded PostgreSQL: `#{cmd.map { |c| File.basename(c) }.first} #{cmd.drop(1).join(' ')}` " \
                          "failed (exit #{status.exitstatus}): #{out.strip[-2000..] || out.strip}"
      end
    end
  end
end
