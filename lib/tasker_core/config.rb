# frozen_string_literal: true

require "erb"
require "yaml"
require "did_you_mean"
require_relative "errors"
require_relative "logging"
require_relative "queues"
require_relative "recurring"

module TaskerCore
  # The resolved configuration: schema defaults, deep-merged with the file's
  # `default:` section, then its environment section, then environment
  # variables, then explicit overrides. Every layer is checked against SCHEMA,
  # which also drives the defaults and docs/configuration.md.
  #
  # A Config is frozen and its hashes are deep-frozen, with string keys.
  class Config
    # protocol: who uses the key on the wire (docs/protocol.md section 13), for the keys that matter there.
    Setting = Struct.new(:key, :type, :default, :doc, :min, :max, :values, :env, :nullable, :protocol, keyword_init: true)

    CURVE_KEY = %r{\A[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\z}
    DURATION = /\A[1-9]\d*[smhd]\z/
    DURATION_UNITS = { "s" => 1, "m" => 60, "h" => 3600, "d" => 86_400 }.freeze
    ENDPOINT_EXPECTATION = "an endpoint tcp://host:port (port 1..65535 or *), ipc://path or inproc://name"

    # key path => how it is checked, its default and what it means.
    SCHEMA = [
      Setting.new(key: "zeromq.enabled", type: :boolean, default: true,
                  doc: "Dispatch steps to worker processes over ZeroMQ. When false, nothing binds or connects."),
      Setting.new(key: "zeromq.batch_endpoint", protocol: "orchestrator binds, workers connect", type: :endpoint, default: "tcp://127.0.0.1:5555",
                  env: "TASKER_BATCH_ENDPOINT",
                  doc: "Where batches travel: the orchestrator binds it, workers connect to it."),
      Setting.new(key: "zeromq.result_endpoint", protocol: "orchestrator binds, workers connect", type: :endpoint, default: "tcp://127.0.0.1:5556",
                  env: "TASKER_RESULT_ENDPOINT",
                  doc: "Where results, completions and heartbeats travel: the orchestrator binds it, workers connect."),
      Setting.new(key: "zeromq.send_hwm", protocol: "both: ZMQ_SNDHWM", type: :integer, default: 1000, min: 0,
                  doc: "Send high-water mark (messages queued per peer; 0 = unlimited). " \
                       "A message refused at the mark is counted as dropped and re-dispatched later."),
      Setting.new(key: "zeromq.recv_hwm", protocol: "both: ZMQ_RCVHWM", type: :integer, default: 1000, min: 0,
                  doc: "Receive high-water mark (messages queued per peer; 0 = unlimited)."),
      Setting.new(key: "zeromq.linger_ms", protocol: "both, on close", type: :integer, default: 1000, min: -1,
                  doc: "How long closing a socket waits to flush unsent messages (-1 = forever, 0 = discard)."),
      Setting.new(key: "zeromq.heartbeat_interval_ms", protocol: "workers: heartbeat period", type: :integer, default: 1000, min: 1,
                  doc: "How often a worker sends a heartbeat."),
      Setting.new(key: "zeromq.heartbeat_timeout_ms", protocol: "orchestrator: a silent worker is dropped after it", type: :integer, default: 5000, min: 1,
                  doc: "How long a silent worker stays live; must exceed zeromq.heartbeat_interval_ms."),
      Setting.new(key: "zeromq.max_message_bytes", protocol: "both: ZMQ_MAXMSGSIZE; workers advertise it in heartbeat `limits`", type: :integer, default: 16 * 1024 * 1024, min: 1,
                  doc: "Largest message a socket accepts; a bigger one is refused (ZMQ_MAXMSGSIZE)."),
      Setting.new(key: "zeromq.max_result_bytes", protocol: "orchestrator: largest result body; sent in each batch's `limits`", type: :integer, default: 4 * 1024 * 1024, min: 0,
                  doc: "Largest result body the orchestrator accepts. Each batch tells workers the limit; a worker " \
                       "fails a step whose result would be bigger (PayloadTooLargeError, not retryable). A bigger " \
                       "body that arrives anyway is counted (too_large) and dropped. 0 = only " \
                       "zeromq.max_message_bytes applies."),
      Setting.new(key: "zeromq.max_batch_steps", protocol: "workers: advertised in heartbeat `limits`", type: :integer, default: 10_000, min: 1,
                  doc: "Most steps a worker accepts in one batch (advertised in its heartbeats; the orchestrator " \
                       "never sends more). Steps beyond it are refused with a batch_refusal and dispatched again."),
      Setting.new(key: "zeromq.max_payload_depth", protocol: "both: contexts, handler_configs, outputs; in both `limits`", type: :integer, default: 24, min: 1, max: 28,
                  doc: "Deepest nesting of maps and arrays in a task context, a handler_config or a step output. " \
                       "create_task refuses a deeper context (PayloadTooDeepError); a deeper output fails its " \
                       "step, not retryable. Messages add at most four levels, under the decoder's fixed 32."),
      Setting.new(key: "zeromq.max_context_bytes", type: :integer, default: 4 * 1024 * 1024, min: 1,
                  doc: "Largest packed task context create_task accepts (PayloadTooLargeError beyond it)."),
      Setting.new(key: "zeromq.allow_insecure", type: :boolean, default: false,
                  doc: "Allow the orchestrator to bind a non-loopback address without CURVE. Off, such a bind " \
                       "is refused (ConfigurationError). On, anyone who can reach the ports can take batches " \
                       "(contexts and outputs included), send results that are applied, and fill the " \
                       "orchestrator's queues; see docs/security.md."),
      Setting.new(key: "zeromq.curve.enabled", protocol: "both: CURVE on both channels (section 14)", type: :boolean, default: false,
                  doc: "Authenticate and encrypt both channels with CurveZMQ: the orchestrator is the CURVE " \
                       "server, workers are clients and must be on the allow-list (docs/security.md)."),
      Setting.new(key: "zeromq.curve.server_public_key", protocol: "workers: the orchestrator's key (section 14)", type: :curve_key, default: nil, nullable: true,
                  env: "TASKER_CURVE_SERVER_PUBLIC_KEY",
                  doc: "The orchestrator's public key (Z85, 40 characters); workers need it."),
      Setting.new(key: "zeromq.curve.server_secret_key_file", type: :string, default: nil, nullable: true,
                  env: "TASKER_CURVE_SERVER_SECRET_KEY_FILE",
                  doc: "File holding the orchestrator's secret key (mode 0600, else refused). " \
                       "TASKER_CURVE_SERVER_SECRET_KEY, when set, holds the key itself and wins."),
      Setting.new(key: "zeromq.curve.client_public_key", type: :curve_key, default: nil, nullable: true,
                  env: "TASKER_CURVE_CLIENT_PUBLIC_KEY",
                  doc: "This worker's public key (Z85); null = derived from its secret key."),
      Setting.new(key: "zeromq.curve.client_secret_key_file", type: :string, default: nil, nullable: true,
                  env: "TASKER_CURVE_CLIENT_SECRET_KEY_FILE",
                  doc: "File holding this worker's secret key (mode 0600, else refused). " \
                       "TASKER_CURVE_CLIENT_SECRET_KEY, when set, holds the key itself and wins."),
      Setting.new(key: "zeromq.curve.allowed_client_keys", protocol: "orchestrator: who may connect (section 14)", type: :curve_key_list, default: [],
                  doc: "Public keys (Z85) of the workers allowed to connect; every other client is refused."),
      Setting.new(key: "zeromq.curve.allowed_client_keys_file", type: :string, default: nil, nullable: true,
                  env: "TASKER_CURVE_ALLOWED_CLIENT_KEYS_FILE",
                  doc: "File of allowed worker public keys, one per line (# comments), added to allowed_client_keys."),
      Setting.new(key: "worker.max_workers", protocol: "workers: heartbeat `capacity`", type: :integer, default: 10, min: 1, max: 1024,
                  doc: "Threads per worker process running step handlers; advertised as its capacity, with prefetch."),
      Setting.new(key: "worker.prefetch", protocol: "workers: heartbeat `capacity` is max_workers + prefetch", type: :integer, default: 0, min: 0, max: 10_000,
                  doc: "Steps a worker takes beyond its threads: they wait in its queue and start as threads free up, " \
                       "so the next batch is already there when a step ends. For steps much shorter than " \
                       "`orchestration.dispatch_timeout_ms`: a step's re-dispatch deadline runs while it waits, and a " \
                       "worker that dies loses an attempt of each step it held; a draining worker hands its queue back " \
                       "(neither a lost attempt nor a failure). `tasker worker --prefetch N` overrides it."),
      Setting.new(key: "worker.queues", protocol: "workers: heartbeat `queues`", type: :queue_list, default: [Queues::DEFAULT],
                  doc: "Queues this worker serves (advertised in its heartbeats); the orchestrator sends it only " \
                       "steps of these queues. `tasker worker --queues a,b` overrides it."),
      Setting.new(key: "worker.step_timeout_ms", protocol: "workers: timeout of a step whose `timeout_ms` is 0 or nil", type: :integer, default: 30_000, min: 1,
                  doc: "Timeout of a step that does not set its own."),
      Setting.new(key: "worker.shutdown_timeout_ms", protocol: "workers: drain limit (section 10)", type: :integer, default: 25_000, min: 0,
                  doc: "On TERM/INT, how long a worker waits for running steps before it stops."),
      Setting.new(key: "orchestration.batch_size", type: :integer, default: 100, min: 1, max: 10_000,
                  doc: "Most steps claimed from the database and sent in one batch."),
      Setting.new(key: "orchestration.dispatch_timeout_ms", protocol: "orchestrator: re-dispatch deadline past a step's timeout (section 9)", type: :integer, default: 10_000, min: 1,
                  doc: "How long past a step's own timeout the orchestrator waits for its result " \
                       "before it treats the step as lost and dispatches it again."),
      Setting.new(key: "orchestration.max_lost_attempts", protocol: "orchestrator: lost attempts before `StepLostError`", type: :integer, default: 5, min: 1, max: 1000,
                  doc: "How many times a step may be lost (its worker or orchestrator lost, its lease expired, " \
                       "its batch refused) and dispatched again without spending its retry budget. One more " \
                       "loss fails it with StepLostError, not retryable: a step that kills every worker that " \
                       "runs it stops there."),
      Setting.new(key: "queues", type: :queue_map, default: {},
                  doc: "Options per queue: `{ api: { concurrency: 5 } }` allows at most 5 steps of the queue api " \
                       "in flight at once across all workers and every orchestrator on the database (enforced " \
                       "by the claim). Queues not listed have no limit."),
      Setting.new(key: "database.url", type: :string, default: nil, nullable: true, env: "DATABASE_URL",
                  doc: "PostgreSQL connection URL or conninfo string; null = libpq's PG* environment variables."),
      Setting.new(key: "database.pool", type: :integer, default: 5, min: 1, max: 1000,
                  doc: "Most connections the store opens (the Ruby API's pool; an orchestrator's loop holds two more sessions of its own: one claims, one writes results)."),
      Setting.new(key: "database.connect_timeout_s", type: :integer, default: 5, min: 0,
                  doc: "libpq connect_timeout in seconds (0 = wait forever)."),
      Setting.new(key: "database.statement_timeout_ms", type: :integer, default: 0, min: 0,
                  doc: "PostgreSQL statement_timeout for the store's sessions (0 = none)."),
      Setting.new(key: "tasks.template_dir", type: :string, default: "config/tasks",
                  doc: "Folder of task template YAML files (*.yml), relative to the application root " \
                       "(Rails.root, else the current directory) unless absolute."),
      Setting.new(key: "discovery.name", protocol: "both: endpoints looked up through PostgreSQL (section 15)", type: :string, default: nil, nullable: true, env: "TASKER_DISCOVERY_NAME",
                  doc: "Discovery through PostgreSQL: an orchestrator registers its endpoints under this name; " \
                       "a worker with it set (and no endpoints on its command line) looks them up and follows " \
                       "changes. null = off (workers use zeromq.*_endpoint)."),
      Setting.new(key: "discovery.ttl_ms", protocol: "orchestrator: lease of its discovery entry", type: :integer, default: 15_000, min: 300,
                  doc: "Lease of a discovery registration; renewed every ttl/3. A crashed orchestrator's entry " \
                       "disappears this long after its last renewal."),
      Setting.new(key: "logging.level", type: :enum, default: "info", values: %w[debug info warn error],
                  env: "TASKER_LOG_LEVEL",
                  doc: "Level of TaskerCore.logger (when it is the gem's own logger)."),
      Setting.new(key: "logging.format", type: :enum, default: "text", values: %w[text json],
                  env: "TASKER_LOG_FORMAT",
                  doc: "Format of the gem's own logger: text (ISO 8601 UTC time with milliseconds, level, " \
                       "process, message, then key=value fields) or json (one object per line: time, level, pid, " \
                       "progname, message and the fields task_id, step_id, step_name, attempt, worker_id where known)."),
      Setting.new(key: "retention.finished_after", type: :duration, default: "14d", nullable: true,
                  doc: "Finished tasks (complete, error, cancelled) older than this are deleted with their steps, " \
                       "edges and histories by the orchestrator process, a small batch per transaction, one " \
                       "orchestrator at a time. A duration: a whole number and s, m, h or d (\"90m\", \"14d\"). " \
                       "null = keep everything."),
      Setting.new(key: "retention.interval_s", type: :integer, default: 600, min: 1,
                  doc: "How often the orchestrator process looks for finished tasks past retention.finished_after."),
      Setting.new(key: "active_job.timeout_ms", type: :integer, default: 3_600_000, min: 1,
                  doc: "Timeout of the step that runs an ActiveJob job (the queue adapter :tasker_core): a job " \
                       "still running after it is abandoned and its step fails (StepTimeoutError). Jobs often " \
                       "run longer than steps, hence its own setting (worker.step_timeout_ms is for steps)."),
      Setting.new(key: "recurring", type: :recurring, default: [],
                  doc: "Recurring tasks, created by the orchestrator processes exactly once per tick: a list of " \
                       "entries with name (unique), task (a template), cron (fugit syntax: five fields, or six " \
                       "with seconds first, an optional time zone, or @hourly and the like) and optionally " \
                       "namespace, version, context, queue, priority and backfill (default false: ticks missed " \
                       "while no orchestrator ran are skipped; true: the latest #{Recurring::MAX_TICKS} missed are created). An " \
                       "environment section's list replaces the default one. See README, Recurring tasks."),
    ].to_h { |s| [s.key, s.freeze] }.freeze

    # Every key that holds settings rather than a value: "zeromq", "worker", ...
    SECTIONS = SCHEMA.keys.flat_map { |k|
      parts = k.split(".")
      (1...parts.size).map { |i| parts.first(i).join(".") }
    }.uniq.freeze
    BASE_SECTION = "default"
    DEFAULT_PATH = File.expand_path("../../config/tasker-config.yml", __dir__)
    APP_RELATIVE_PATH = File.join("config", "tasker-config.yml")

    class << self
      # A callable returning the database to use when neither database.url
      # nor DATABASE_URL names one (nil: libpq's PG* variables). Under Rails
      # with ActiveRecord, the Railtie sets it to the app's connection config
      # (TaskerCore::ActiveRecordDatabase.url).
      attr_accessor :database_url_fallback

      # Reads, merges and checks the configuration. path: nil and env: nil
      # resolve as described in docs/configuration.md; overrides is a nested
      # hash (string or symbol keys) applied last and checked the same way.
      def load(path: nil, env: nil, overrides: {})
        env = (env || environment_from_env).to_s
        path, path_source = resolve_path(path)
        data = expand_dots(defaults)
        sections = read_file(path, path_source)
        [BASE_SECTION, env].uniq.each do |name|
          layer = sections[name] || {}
          check_layer(layer, path: path, source: %(section "#{name}"))
          data = deep_merge(data, layer)
        end
        SCHEMA.each_value do |s|
          next unless s.env && ENV[s.env] && !ENV[s.env].empty?

          check_value(s, ENV[s.env], path: path, source: "environment variable #{s.env}")
          data = deep_merge(data, expand_dots(s.key => ENV[s.env]))
        end
        raise ArgumentError, "overrides: expected a Hash, got #{got(overrides)}" unless overrides.is_a?(Hash)

        overrides = stringify_keys(overrides)
        check_layer(overrides, path: path, source: "overrides")
        data = deep_merge(data, overrides)
        check_relations(data, path: path, source: %(environment "#{env}"))
        if data.dig("database", "url").to_s.empty? && database_url_fallback && (url = database_url_fallback.call)
          data = deep_merge(data, "database" => { "url" => url })
        end
        new(data, environment: env, path: path, environments: sections.keys - [BASE_SECTION])
      end

      # { "zeromq.enabled" => true, ... } for every key in SCHEMA.
      def defaults
        SCHEMA.transform_values(&:default)
      end

      # "14d" -> 1_209_600 (seconds); ArgumentError for anything else.
      def duration_seconds(text)
        text = text.to_s.strip
        raise ArgumentError, "expected a duration such as 7d, 12h, 30m or 45s, got #{text.inspect}" unless text.match?(DURATION)

        Integer(text[0...-1], 10) * DURATION_UNITS.fetch(text[-1])
      end

      def environment_from_env
        %w[TASKER_ENV RAILS_ENV RACK_ENV].map { |v| ENV[v] }.find { |v| v && !v.empty? } || "development"
      end

      # The Markdown table in docs/configuration.md, generated from SCHEMA.
      def reference_table
        rows = SCHEMA.each_value.map do |s|
          default = s.default.nil? ? "null" : "`#{s.default}`"
          env = s.env ? "`#{s.env}`" : ""
          type = if s.type == :endpoint then "endpoint: `tcp://host:port` (port 1..65535 or `*`), `ipc://path`, `inproc://name`"
                 else expectation(s).delete_prefix("an ").delete_prefix("a ")
                 end
          "| `#{s.key}` | #{type} | #{default} | #{env} | #{s.doc} |"
        end
        ["| Key | Type | Default | Environment variable | Meaning |", "|---|---|---|---|---|", *rows].join("\n")
      end

      # The Markdown table of docs/protocol.md section 13: the keys that
      # matter on the wire, generated from SCHEMA.
      def protocol_table
        rows = SCHEMA.each_value.select(&:protocol).map do |s|
          "| `#{s.key}` | #{s.default.nil? ? 'null' : "`#{s.default}`"} | #{s.protocol} |"
        end
        ["| key | default | used by |", "|---|---|---|", *rows].join("\n")
      end

      # Generated regions of the docs: file => { marker => text between
      # <!-- marker:begin --> and <!-- marker:end --> }.
      def generated_docs
        settings = { "settings" => reference_table }
        { "README.md" => settings, "docs/configuration.md" => settings,
          "docs/protocol.md" => { "protocol-settings" => protocol_table } }
      end

      # Rewrites the generated regions under root (bin/sync-docs, rake
      # docs); with write: false only reports. Returns the files that were
      # (or would be) changed.
      def sync_docs(root, write: true)
        generated_docs.filter_map do |rel, regions|
          path = File.join(root, rel)
          text = File.read(path)
          updated = regions.reduce(text) do |t, (marker, body)|
            t.sub(/<!-- #{marker}:begin -->\n.*?<!-- #{marker}:end -->/m) { "<!-- #{marker}:begin -->\n#{body}\n<!-- #{marker}:end -->" }
          end
          next if updated == text

          File.write(path, updated) if write
          rel
        end
      end

      private

      # [path, where the path came from]
      def resolve_path(path)
        return [File.expand_path(path), "path: argument"] if path

        from_env = ENV["TASKER_CONFIG_PATH"]
        return [File.expand_path(from_env), "TASKER_CONFIG_PATH"] if from_env && !from_env.empty?

        rails_root = defined?(::Rails) && ::Rails.respond_to?(:root) && ::Rails.root
        app_file = File.join((rails_root || Dir.pwd).to_s, APP_RELATIVE_PATH)
        File.file?(app_file) ? [app_file, "the application"] : [DEFAULT_PATH, "the gem's default"]
      end

      # { "default" => {...}, "production" => {...}, ... }
      def read_file(path, path_source)
        unless File.file?(path)
          raise ConfigurationError, "Invalid tasker_core configuration: file #{path} (from #{path_source}) not found"
        end

        doc = parse_yaml(render_erb(File.read(path), path), path)
        return {} if doc.nil?
        unless doc.is_a?(Hash)
          fail_at(path, nil, "(top level)",
                  "expected a mapping of #{BASE_SECTION}: and environment sections, got #{got(doc)}")
        end

        doc.to_h do |name, section|
          name = name.to_s
          if SECTIONS.include?(name) || SCHEMA.key?(name)
            fail_at(path, nil, name, "settings go under #{BASE_SECTION}: or an environment section, not at the top level")
          end
          unless section.nil? || section.is_a?(Hash)
            fail_at(path, nil, name, "expected a mapping of settings, got #{got(section)}")
          end
          [name, section]
        end
      rescue SystemCallError => e
        raise ConfigurationError, "Invalid tasker_core configuration: cannot read #{path} (#{e.message})"
      end

      def render_erb(text, path)
        ERB.new(text).result
      rescue StandardError, ScriptError => e
        raise ConfigurationError, "Invalid tasker_core configuration in #{path}: ERB failed (#{e.class}: #{e.message})"
      end

      def parse_yaml(text, path)
        YAML.safe_load(text, permitted_classes: [], permitted_symbols: [], aliases: true, filename: path)
      rescue Psych::Exception => e
        raise ConfigurationError, "Invalid tasker_core configuration in #{path}: not valid YAML (#{e.message})"
      end

      # Checks one layer (a nested hash) against SCHEMA: unknown keys, types, ranges.
      def check_layer(hash, path:, source:, prefix: nil)
        hash.each do |key, value|
          full = [prefix, key.to_s].compact.join(".")
          if SCHEMA.key?(full)
            check_value(SCHEMA[full], value, path: path, source: source)
          elsif SECTIONS.include?(full)
            next if value.nil?
            fail_at(path, source, full, "expected a mapping of settings, got #{got(value)}") unless value.is_a?(Hash)

            check_layer(value, path: path, source: source, prefix: full)
          else
            fail_at(path, source, full, "unknown key#{suggestion(full)}")
          end
        end
      end

      def check_value(setting, value, path:, source:)
        return if value.nil? && setting.nullable
        if setting.type == :queue_map && (problem = queue_map_problem(value))
          fail_at(path, source, problem[0], problem[1])
        end
        if setting.type == :recurring
          where, problem = Recurring.problem(value)
          fail_at(path, source, "#{setting.key}#{where}", problem) if problem
          return
        end
        return if valid?(setting, value)

        fail_at(path, source, setting.key, "expected #{expectation(setting)}, got #{got(value)}")
      end

      def valid?(setting, value)
        case setting.type
        when :boolean then value == true || value == false
        when :integer
          value.is_a?(Integer) && (!setting.min || value >= setting.min) && (!setting.max || value <= setting.max)
        when :string then value.is_a?(String) && !value.empty?
        when :enum then setting.values.include?(value)
        when :endpoint then value.is_a?(String) && endpoint?(value)
        when :curve_key then value.is_a?(String) && value.match?(CURVE_KEY)
        when :curve_key_list then value.is_a?(Array) && value.all? { |k| k.is_a?(String) && k.match?(CURVE_KEY) }
        when :duration then value.is_a?(String) && value.match?(DURATION)
        when :queue_list then value.is_a?(Array) && value.size.between?(1, Queues::MAX_PER_WORKER) && value.all? { |q| Queues.name?(q) }
        when :queue_map then queue_map_problem(value).nil?
        end
      end

      QUEUE_OPTIONS = %w[concurrency].freeze

      # [key, problem] for the first thing wrong in a queues: mapping, or nil.
      def queue_map_problem(value)
        return ["queues", "expected a mapping of queue names to options, got #{got(value)}"] unless value.is_a?(Hash)

        value.each do |name, opts|
          return ["queues", Queues.name_problem(name.to_s)] unless Queues.name?(name.to_s)
          next if opts.nil?
          return ["queues.#{name}", "expected a mapping of options (#{QUEUE_OPTIONS.join(', ')}), got #{got(opts)}"] unless opts.is_a?(Hash)

          opts.each do |k, v|
            return ["queues.#{name}.#{k}", "unknown queue option (known: #{QUEUE_OPTIONS.join(', ')})"] unless QUEUE_OPTIONS.include?(k.to_s)
            return ["queues.#{name}.#{k}", "expected an Integer >= 1, got #{got(v)}"] unless v.is_a?(Integer) && v >= 1
          end
        end
        nil
      end

      def endpoint?(value)
        case value
        when %r{\Atcp://(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?<port>\*|\d{1,5})\z}
          port = Regexp.last_match(:port)
          port == "*" || port.to_i.between?(1, 65_535)
        when %r{\Aipc://\S.*\z}, %r{\Ainproc://\S+\z} then true
        else false
        end
      end

      def expectation(setting)
        case setting.type
        when :boolean then "true or false"
        when :integer
          if setting.min && setting.max then "an Integer between #{setting.min} and #{setting.max}"
          else "an Integer >= #{setting.min}"
          end
        when :string then setting.nullable ? "a non-empty String or null" : "a non-empty String"
        when :enum then "one of #{setting.values.map(&:inspect).join(', ')}"
        when :endpoint then ENDPOINT_EXPECTATION
        when :curve_key then "a CURVE public key (40 Z85 characters) or null"
        when :curve_key_list then "a list of CURVE public keys (40 Z85 characters each)"
        when :duration then "a duration such as \"14d\" (a whole number and s, m, h or d)#{' or null' if setting.nullable}"
        when :queue_list then "a list of 1 to #{Queues::MAX_PER_WORKER} queue names (A-Z a-z 0-9 _ . : -, 1 to 63 characters)"
        when :queue_map then "a mapping of queue names to { concurrency: Integer >= 1 }"
        when :recurring then "a list of recurring task entries"
        end
      end

      def check_relations(data, path:, source:)
        interval = data.dig("zeromq", "heartbeat_interval_ms")
        timeout = data.dig("zeromq", "heartbeat_timeout_ms")
        return if timeout > interval

        fail_at(path, source, "zeromq.heartbeat_timeout_ms",
                "expected more than zeromq.heartbeat_interval_ms (#{interval}), got #{timeout}")
      end

      def suggestion(full)
        *parents, leaf = full.split(".")
        # The same name in another section first (a key in the wrong place), then a near spelling.
        near = SCHEMA.keys.find { |k| k.end_with?(".#{leaf}") }
        siblings = (SCHEMA.keys + SECTIONS).select { |k| k.split(".")[0...-1] == parents }
        near ||= DidYouMean::SpellChecker.new(dictionary: siblings.map { |k| k.split(".").last })
                                         .correct(leaf).first&.then { |n| (parents + [n]).join(".") }
        near ? " (did you mean #{near}?)" : ""
      end

      def fail_at(path, source, key, problem)
        where = source ? "#{path} (#{source})" : path
        raise ConfigurationError, "Invalid tasker_core configuration in #{where}: #{key}: #{problem}"
      end

      def got(value)
        "#{value.inspect} (#{value.class})"
      end

      def expand_dots(flat)
        flat.each_with_object({}) do |(key, value), out|
          *parents, leaf = key.split(".")
          parents.inject(out) { |h, k| h[k] ||= {} }[leaf] = value
        end
      end

      def stringify_keys(hash)
        hash.to_h { |k, v| [k.to_s, v.is_a?(Hash) ? stringify_keys(v) : v] }
      end

      def deep_merge(base, top)
        base.merge(top.transform_keys(&:to_s)) do |_key, old, new|
          old.is_a?(Hash) && (new.is_a?(Hash) || new.nil?) ? deep_merge(old, new || {}) : new
        end
      end

      def deep_freeze(value)
        case value
        when Hash then value.to_h { |k, v| [k.dup.freeze, deep_freeze(v)] }.freeze
        when Array then value.map { |v| deep_freeze(v) }.freeze
        when String then value.dup.freeze
        else value.freeze
        end
      end
    end

    private_class_method :new

    # environments: the sections the file names besides default:.
    attr_reader :environment, :path, :environments

    def initialize(data, environment:, path:, environments: [])
      @data = self.class.send(:deep_freeze, data)
      @environment = environment.dup.freeze
      @path = path.dup.freeze
      @environments = environments.map { |e| e.dup.freeze }.freeze
      freeze
    end

    def to_h = @data
    def [](key) = @data[key.to_s]
    def dig(*keys) = @data.dig(*keys.map(&:to_s))
    def zeromq = @data["zeromq"]
    def worker = @data["worker"]
    def orchestration = @data["orchestration"]
    def database = @data["database"]
    def logging = @data["logging"]
    def tasks = @data["tasks"]
    def retention = @data["retention"]
    def queues = @data["queues"]
    def recurring = @data["recurring"]

    # Keeps a password in database.url out of logs and consoles.
    def inspect
      url = database["url"]&.sub(%r{(://[^:/@]*:)[^@]*@}, '\1[FILTERED]@')&.gsub(/(password\s*=\s*)\S+/i, '\1[FILTERED]')
      shown = @data.merge("database" => database.merge("url" => url))
      "#<#{self.class} environment=#{environment.inspect} path=#{path.inspect} #{shown.inspect}>"
    end
  end

  @config = nil
  @config_lock = Mutex.new

  class << self
    # The resolved configuration, loaded on first use.
    def config
      @config || @config_lock.synchronize { @config ||= Config.load.tap { |c| apply_logging_config(c) } }
    end

    def config=(config)
      raise TypeError, "expected a TaskerCore::Config, got #{config.class}" unless config.is_a?(Config)

      @config_lock.synchronize { @config = config }
      apply_logging_config(config)
      config
    end

    def configure(path: nil, env: nil, overrides: {})
      self.config = Config.load(path: path, env: env, overrides: overrides)
    end

    # Forgets the loaded configuration; the next TaskerCore.config reads it again.
    def reset_config!
      @config_lock.synchronize { @config = nil }
    end
  end
end
