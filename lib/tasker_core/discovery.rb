# frozen_string_literal: true

require "json"
require "socket"
require "securerandom"

module TaskerCore
  # Endpoint discovery through PostgreSQL (table tasker_orchestrators,
  # db/migrate/0003): an orchestrator registers its batch and result
  # endpoints under a name with a lease that a thread keeps renewing, and
  # revokes it on clean shutdown; a crashed orchestrator's entry expires
  # with its lease. Workers look the name up and follow changes through
  # LISTEN tasker_discovery (a session connection: not through PgBouncer in
  # transaction mode).
  #
  #   reg = TaskerCore::Discovery.register("orders", { batch_endpoint: "tcp://10.0.0.5:5555",
  #                                                    result_endpoint: "tcp://10.0.0.5:5556" }, ttl: 15)
  #   TaskerCore::Discovery.lookup("orders")   # => Entry or nil
  #   w = TaskerCore::Discovery.watch("orders") { |entry| ... }   # entry nil = gone
  #   reg.stop                                  # revoke
  module Discovery
    CHANNEL = "tasker_discovery"

    # Another orchestrator holds a live lease on the name.
    class NameTakenError < TaskerCore::Error; end

    Entry = Struct.new(:name, :batch_endpoint, :result_endpoint, :owner, :version, :live, :lease_expires_at,
                       keyword_init: true) do
      def endpoints = { batch_endpoint: batch_endpoint, result_endpoint: result_endpoint }
    end

    LOOKUP_SQL = <<~SQL
      SELECT name, batch_endpoint, result_endpoint, owner, version, lease_expires_at > now() AS live,
             extract(epoch FROM lease_expires_at)::float8 AS lease_expires_at
        FROM tasker_orchestrators WHERE name = $1
    SQL

    class << self
      def configured_name = TaskerCore.config.dig("discovery", "name")
      def configured_ttl = TaskerCore.config.dig("discovery", "ttl_ms") / 1000.0

      def database_url
        url = TaskerCore.config.dig("database", "url")
        url.nil? || url.empty? ? (ENV["DATABASE_URL"] || "") : url
      end

      def connect(url = database_url)
        Store::Connection.new(url, connect_timeout: TaskerCore.config.dig("database", "connect_timeout_s"))
      end

      # Registers endpoints ({batch_endpoint:, result_endpoint:}) under name
      # and keeps the lease alive (renewed every ttl/3 seconds) until
      # Registration#stop. wait: seconds to wait for a name another live
      # orchestrator holds (a standby); NameTakenError after that.
      def register(name, endpoints, ttl: configured_ttl, owner: nil, wait: 0, url: database_url, logger: nil)
        Registration.new(name, endpoints, ttl: ttl, owner: owner, url: url, logger: logger).start(wait: wait)
      end

      # The live entry for name, or nil (none, revoked or expired).
      def lookup(name, url: database_url)
        entry = read(name, url: url)
        entry&.live ? entry : nil
      end

      # The entry as stored, live or not (nil when the name was never registered).
      def read(name, url: nil, conn: nil)
        own = conn.nil?
        conn ||= connect(url || database_url)
        row = conn.exec(LOOKUP_SQL, [name.to_s]).first
        row && entry_from(row)
      ensure
        conn&.close if own
      end

      # Waits (polling) until name has a live entry; returns it.
      def wait_for(name, timeout: nil, interval: 0.1, url: database_url)
        deadline = timeout && monotonic + timeout
        conn = connect(url)
        loop do
          entry = read(name, conn: conn)
          return entry if entry&.live
          raise WaitTimeoutError, "no orchestrator registered as #{name.inspect} after #{timeout}s" if deadline && monotonic >= deadline

          sleep interval
        end
      ensure
        conn&.close
      end

      # Calls the block with the live Entry for name now (when there is one)
      # and on every later change: a new registration (Entry), a revoke or an
      # expired lease (nil). Returns the started Watcher.
      def watch(name, url: database_url, poll_interval: nil, logger: nil, &block)
        Watcher.new(name, url: url, poll_interval: poll_interval, logger: logger, &block).start
      end

      # Orchestrator side: starts the orchestration loop, registering the
      # handle's endpoints under name (OrchestrationManager#start_orchestration
      # calls #on_orchestration_started).
      def start_orchestration(name: configured_name, ttl: configured_ttl, wait: 0, **loop_options)
        Internal::OrchestrationManager.instance.start_orchestration(discovery: { name: name, ttl: ttl, wait: wait },
                                                                    **loop_options)
      end

      def stop_orchestration(timeout_ms: 10_000)
        Internal::OrchestrationManager.instance.stop_orchestration(timeout_ms: timeout_ms)
      end

      # The hook: registers the handle's endpoints under name (nil: discovery
      # is off, nothing happens). Returns the Registration.
      def on_orchestration_started(handle, name: configured_name, ttl: configured_ttl, wait: 0)
        return nil if name.nil? || name.to_s.empty?

        zmq = handle.zeromq_config
        endpoints = { batch_endpoint: advertised(zmq["batch_endpoint"]), result_endpoint: advertised(zmq["result_endpoint"]) }
        @registration_lock.synchronize do
          @registration&.stop
          @registration = register(name, endpoints, ttl: ttl, wait: wait)
        end
      end

      # The hook on stop: revokes this process's registration at once.
      def on_orchestration_stopping
        @registration_lock.synchronize do
          reg = @registration
          @registration = nil
          reg&.stop if reg&.pid == Process.pid
        end
        nil
      end

      def registration = @registration_lock.synchronize { @registration }

      # A bound wildcard (tcp://*:5555, tcp://0.0.0.0:5555) is advertised with
      # this host's name; workers must be able to resolve it.
      def advertised(endpoint)
        endpoint.sub(%r{\Atcp://(\*|0\.0\.0\.0|\[::\]):}) { "tcp://#{::Socket.gethostname}:" }
      end

      def entry_from(row)
        Entry.new(name: row["name"], batch_endpoint: row["batch_endpoint"], result_endpoint: row["result_endpoint"],
                  owner: row["owner"], version: row["version"], live: row["live"],
                  lease_expires_at: row["lease_expires_at"] && Time.at(row["lease_expires_at"]).utc)
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
    @registration = nil
    @registration_lock = Mutex.new

    # A registered name whose lease a thread renews every ttl/3 seconds.
    class Registration
      attr_reader :name, :owner, :ttl, :pid, :endpoints

      def initialize(name, endpoints, ttl:, owner: nil, url: Discovery.database_url, logger: nil)
        @name = name.to_s
        @endpoints = { batch_endpoint: fetch(endpoints, :batch_endpoint), result_endpoint: fetch(endpoints, :result_endpoint) }
        @ttl = Float(ttl)
        raise ArgumentError, "ttl must be at least 0.3 seconds" if @ttl < 0.3

        @owner = owner || "#{::Socket.gethostname[0, 60]}-#{Process.pid}-#{SecureRandom.hex(4)}"
        @url = url
        @logger = logger || TaskerCore.logger
        @lock = Mutex.new
        @cond = ConditionVariable.new
        @stopping = false
        @renewals = 0
        @held = false
      end

      # Takes the name (waiting up to wait seconds for a live holder's lease
      # to end) and starts the renewing thread.
      def start(wait: 0)
        @conn = Discovery.connect(@url)
        deadline = Discovery.monotonic + wait
        until take
          raise NameTakenError, "discovery name #{@name.inspect} is held by #{@holder} until its lease ends" if Discovery.monotonic >= deadline

          sleep [@ttl / 10, 0.1].min
        end
        @pid = Process.pid
        @thread = Thread.new { renew_loop }
        @thread.name = "tasker-discovery-lease"
        self
      rescue StandardError
        @conn&.close
        raise
      end

      def version = @lock.synchronize { @version }
      def renewals = @lock.synchronize { @renewals }
      # Whether this process holds the name now (false after a takeover).
      def held? = @lock.synchronize { @held }

      # Stops renewing and revokes: lookups miss the entry at once and
      # watchers are notified. Idempotent; returns true when revoked now.
      def stop
        thread = @lock.synchronize do
          return false if @stopping

          @stopping = true
          @cond.broadcast
          @thread
        end
        thread&.join
        return false if @pid != Process.pid # inherited across fork: the parent owns the lease

        revoked = begin
          @conn.exec("SELECT tasker_revoke_orchestrator($1, $2) AS ok", [@name, @owner]).first["ok"]
        rescue Error => e
          @logger.warn("tasker discovery: revoking #{@name.inspect} failed (#{e.message}); it expires with its lease")
          false
        end
        @conn.close
        revoked
      end

      private

      def fetch(endpoints, key)
        endpoints[key] || endpoints[key.to_s] or raise ArgumentError, "endpoints need #{key}"
      end

      # One attempt: true when the name is ours now.
      def take
        row = @conn.exec("SELECT * FROM tasker_register_orchestrator($1, $2, $3, $4, $5)",
                         [@name, @endpoints[:batch_endpoint], @endpoints[:result_endpoint], @owner,
                          (@ttl * 1000).round]).first
        @lock.synchronize do
          @held = row["registered"]
          @version = row["version"] if @held
        end
        @holder = row["owner"]
        @held
      end

      def renew_loop
        interval = @ttl / 3.0
        loop do
          @lock.synchronize do
            @cond.wait(@lock, interval) unless @stopping
            return if @stopping
          end
          renew_once
        end
      end

      def renew_once
        @conn = Discovery.connect(@url) unless @conn.usable?
        renewed = @conn.exec("SELECT tasker_renew_orchestrator($1, $2, $3) AS ok",
                             [@name, @owner, (@ttl * 1000).round]).first["ok"]
        if renewed
          @lock.synchronize { @renewals += 1 }
        elsif take
          @logger.warn("tasker discovery: lease on #{@name.inspect} had run out; registered again")
        else
          @logger.error("tasker discovery: #{@name.inspect} is held by #{@holder}; retrying every #{interval_text}")
        end
      rescue Error => e
        @logger.warn("tasker discovery: renewing #{@name.inspect} failed: #{e.message}")
      end

      def interval_text = "#{(@ttl / 3.0).round(2)}s"
    end

    # Follows one name: LISTEN first, then read, then apply notifications
    # newer than what was read (by version), so no change between the read
    # and the first notification is missed and none is acted on twice. Also
    # re-reads every poll_interval to notice an expired lease (nobody
    # notifies for a crashed orchestrator) and to recover after a lost
    # connection.
    class Watcher
      attr_reader :name

      def initialize(name, url: Discovery.database_url, poll_interval: nil, logger: nil, &block)
        raise ArgumentError, "watch needs a block" unless block

        @name = name.to_s
        @url = url
        @poll_interval = poll_interval || [Discovery.configured_ttl / 3.0, 1.0].min
        @logger = logger || TaskerCore.logger
        @block = block
        @last_version = 0
        @current = :unknown # the last state delivered: an Entry, nil, or :unknown before the first
        @deliveries = 0
        @ready = Thread::Queue.new
      end

      # Starts the thread; returns once the first read is done (and the
      # block has had the current entry).
      def start
        @thread = Thread.new { run }
        @thread.name = "tasker-discovery-watch"
        outcome = @ready.pop
        raise outcome if outcome.is_a?(Exception)

        self
      end

      def deliveries = @deliveries
      def alive? = @thread&.alive? || false

      def stop
        @thread&.kill
        @thread&.join
        nil
      end

      private

      def run
        first = true
        loop do
          conn = nil
          begin
            conn = Discovery.connect(@url)
            conn.exec("LISTEN #{CHANNEL}")
            apply(Discovery.read(@name, conn: conn))
            if first
              first = false
              @ready << :ok
            end
            follow(conn)
          rescue Error => e
            raise if first

            @logger.warn("tasker discovery: watching #{@name.inspect}: #{e.message}; reconnecting")
            sleep @poll_interval
          ensure
            conn&.close if conn&.owner_pid == Process.pid
          end
        end
      rescue Exception => e # rubocop:disable Lint/RescueException
        @ready << e if first
        raise unless first
      end

      def follow(conn)
        loop do
          note = conn.wait_for_notify(@poll_interval)
          if note.nil?
            apply(Discovery.read(@name, conn: conn)) # expiry, or anything missed
            next
          end
          _channel, payload, = note
          data = JSON.parse(payload)
          next unless data["name"] == @name

          apply(Entry.new(name: data["name"], batch_endpoint: data["batch_endpoint"],
                          result_endpoint: data["result_endpoint"], owner: data["owner"],
                          version: data["version"], live: data["live"]))
        end
      end

      # entry: what was read or notified (nil: never registered).
      def apply(entry)
        if entry
          return if entry.version < @last_version
          # a re-read of the version already seen only matters when its lease ran out
          return if entry.version == @last_version && (entry.live || @current.nil?)

          @last_version = entry.version
        end
        state = entry&.live ? entry : nil
        return if same?(state, @current)

        @current = state
        @deliveries += 1
        @block.call(state)
      rescue StandardError => e
        @logger.error("tasker discovery: the watch block for #{@name.inspect} raised #{e.class}: #{e.message}")
      end

      def same?(a, b)
        return a.nil? && b.nil? if a.nil? || b.nil? || b == :unknown

        a.endpoints == b.endpoints && a.owner == b.owner
      end
    end
  end
end
