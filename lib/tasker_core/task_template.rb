# frozen_string_literal: true

require "yaml"
require_relative "errors"
require_relative "payload"
require_relative "queues"

module TaskerCore
  # A workflow description read from YAML: a named, namespaced, versioned
  # DAG of steps, each run by a handler class.
  #
  #   name: order_fulfilment
  #   namespace: shop                 # default "default"
  #   version: 1.2.0                  # default "0.1.0"
  #   context_schema: { type: object, required: [order_id] }   # optional JSON Schema
  #   queue: shop                     # default queue of its steps (else "default")
  #   priority: 0                     # default priority of its steps, -100..100, higher first
  #   concurrency: { key: "%{context.customer_id}", limit: 1 }   # optional, for each step without its own
  #   steps:
  #     - name: charge
  #       handler: Shop::ChargeHandler
  #       queue: payments             # optional: this step's queue
  #       priority: 10                # optional
  #       concurrency: { key: "charge", limit: 5 }   # optional
  #       depends_on: []
  #       handler_config: { currency: EUR }
  #       timeout_ms: 10000           # default worker.step_timeout_ms
  #       retry: { retryable: true, max_attempts: 3, backoff_base_ms: 500, backoff_cap_ms: 30000, jitter: 0.2 }
  #
  # A cycle, an unknown dependency or a duplicate step name raises
  # ConfigurationError naming the file and the step. Handler classes are not
  # looked up here: a process that only creates tasks needs no handler code,
  # and a worker refuses a step whose handler it lacks (unknown_handler, so
  # another worker can take it). validate_handlers: true also requires each
  # handler class to be defined in this process.
  class TaskTemplate
    RETRY_DEFAULTS = { "retryable" => true, "max_attempts" => 3, "backoff_base_ms" => 500,
                       "backoff_cap_ms" => 30_000, "jitter" => 0.2 }.freeze
    TEMPLATE_KEYS = %w[name namespace version description context_schema queue priority concurrency steps].freeze
    STEP_KEYS = %w[name handler depends_on handler_config timeout_ms retry description queue priority
                   concurrency].freeze
    CONCURRENCY_KEYS = %w[key limit].freeze

    # queue, priority and concurrency are nil when the step does not name
    # them: the task's (create_task) or the template's apply (#placement).
    Step = Struct.new(:name, :handler, :depends_on, :handler_config, :timeout_ms, :retryable, :max_attempts,
                      :backoff_base_ms, :backoff_cap_ms, :jitter, :queue, :priority, :concurrency,
                      keyword_init: true)

    attr_reader :name, :namespace, :version, :context_schema, :steps, :path, :queue, :priority, :concurrency

    def self.load_file(path, validate_handlers: false)
      data = YAML.safe_load(File.read(path), permitted_classes: [], aliases: true, filename: path)
      new(data, path: File.expand_path(path), validate_handlers: validate_handlers)
    rescue Psych::Exception => e
      raise ConfigurationError, "Invalid task template #{path}: not valid YAML (#{e.message})"
    rescue SystemCallError => e
      raise ConfigurationError, "Invalid task template #{path}: cannot read it (#{e.message})"
    end

    def initialize(data, path: "(inline template)", validate_handlers: false)
      @path = path
      fail!(nil, "expected a mapping, got #{data.class}") unless data.is_a?(Hash)
      data = stringify(data)
      unknown = data.keys - TEMPLATE_KEYS
      fail!(nil, "unknown key #{unknown.first.inspect} (known: #{TEMPLATE_KEYS.join(', ')})") if unknown.any?
      @name = required_string(data, "name", nil)
      @namespace = (data["namespace"] || "default").to_s
      @version = (data["version"] || "0.1.0").to_s
      @context_schema = load_schema(data["context_schema"])
      @queue, @priority, @concurrency = placement_keys(data, nil)
      @steps = load_steps(data["steps"], validate_handlers)
      check_dag!
      freeze
    end

    def key = [namespace, name, version]
    def full_name = "#{namespace}/#{name}@#{version}"
    def step(name) = steps.find { |s| s.name == name }

    # Raises ValidationError naming the failing path when context does not
    # match context_schema; returns context.
    def validate_context!(context)
      raise ValidationError, "context for #{full_name}: expected a Hash, got #{context.class}" unless context.is_a?(Hash)
      return context unless @schemer

      error = @schemer.validate(stringify(context)).first
      return context unless error

      where = error["data_pointer"].to_s.empty? ? "(root)" : error["data_pointer"]
      raise ValidationError, "context for #{full_name} does not match its context_schema at #{where}: #{error['error']}"
    end

    # Where each step runs for one task, in step order: [queue, priority,
    # concurrency key, concurrency limit]. A step's own queue/priority wins,
    # then the task's (create_task's queue:/priority:), then the template's,
    # then "default"/0. The concurrency key is computed from the context
    # (ValidationError naming the path when it is missing).
    def placement(context, queue: nil, priority: nil)
      steps.map do |s|
        limit = s.concurrency || concurrency
        [s.queue || queue || self.queue || Queues::DEFAULT, s.priority || priority || self.priority || 0,
         limit && Queues.concurrency_key(full_name, limit["key"], context), limit && limit["limit"]]
      end
    end

    # What is stored in tasker_task_templates.definition (JSON).
    def definition
      { "name" => name, "namespace" => namespace, "version" => version, "context_schema" => context_schema,
        "queue" => queue, "priority" => priority, "concurrency" => concurrency,
        "steps" => steps.map { |s| s.to_h.transform_keys(&:to_s) } }.compact
    end

    private

    # A handler_config travels in every batch: the same depth and size
    # limits as a task context.
    def check_payload!(config, step_name)
      Payload.pack_checked(config, what: "handler_config")
    rescue PayloadError => e
      fail!(step_name, e.message)
    end

    def fail!(step, problem)
      where = step ? %(step "#{step}": ) : ""
      named = @name ? " (template #{@namespace ? "#{@namespace}/" : ''}#{@name})" : ""
      raise ConfigurationError, "Invalid task template #{@path}#{named}: #{where}#{problem}"
    end

    def stringify(value)
      case value
      when Hash then value.to_h { |k, v| [k.to_s, stringify(v)] }
      when Array then value.map { |v| stringify(v) }
      when Symbol then value.to_s
      else value
      end
    end

    def required_string(hash, key, step)
      value = hash[key]
      fail!(step, "#{key}: expected a non-empty String, got #{value.inspect}") unless value.is_a?(String) && !value.empty?
      value
    end

    def load_schema(schema)
      return nil if schema.nil?

      fail!(nil, "context_schema: expected a mapping (a JSON Schema), got #{schema.class}") unless schema.is_a?(Hash)
      require "json_schemer"
      fail!(nil, "context_schema: not a valid JSON Schema") unless JSONSchemer.valid_schema?(schema)
      @schemer = JSONSchemer.schema(schema)
      schema.freeze
    end

    def load_steps(list, validate_handlers)
      fail!(nil, "steps: expected a non-empty list of steps") unless list.is_a?(Array) && !list.empty?
      seen = {}
      list.map.with_index do |raw, i|
        fail!(nil, "steps[#{i}]: expected a mapping, got #{raw.class}") unless raw.is_a?(Hash)
        step_name = required_string(raw, "name", nil)
        fail!(step_name, "duplicate step name") if seen[step_name]
        seen[step_name] = true
        unknown = raw.keys - STEP_KEYS
        fail!(step_name, "unknown key #{unknown.first.inspect} (known: #{STEP_KEYS.join(', ')})") if unknown.any?
        build_step(raw, step_name, validate_handlers)
      end.freeze
    end

    def build_step(raw, step_name, validate_handlers)
      handler = required_string(raw, "handler", step_name)
      check_handler!(handler, step_name) if validate_handlers
      deps = Array(raw["depends_on"])
      fail!(step_name, "depends_on: expected step names") unless deps.all? { |d| d.is_a?(String) }
      config = raw["handler_config"] || {}
      fail!(step_name, "handler_config: expected a mapping") unless config.is_a?(Hash)
      check_payload!(config, step_name)
      timeout = raw["timeout_ms"] || default_timeout_ms
      fail!(step_name, "timeout_ms: expected a positive Integer") unless timeout.is_a?(Integer) && timeout.positive?
      queue, priority, limit = placement_keys(raw, step_name)
      Step.new(name: step_name, handler: handler, depends_on: deps.uniq.freeze, handler_config: config.freeze,
               timeout_ms: timeout, queue: queue, priority: priority, concurrency: limit,
               **retry_policy(raw["retry"], step_name)).freeze
    end

    # queue, priority and concurrency of the template (step nil) or a step,
    # each nil when unsaid.
    def placement_keys(raw, step_name)
      queue, priority, limit = raw.values_at("queue", "priority", "concurrency")
      fail!(step_name, "queue: #{Queues.name_problem(queue)}") unless queue.nil? || Queues.name?(queue)
      fail!(step_name, "priority: #{Queues.priority_problem(priority)}") unless priority.nil? || Queues.priority?(priority)
      [queue&.freeze, priority, limit && concurrency_limit(limit, step_name)]
    end

    def concurrency_limit(raw, step_name)
      fail!(step_name, "concurrency: expected a mapping { key:, limit: }, got #{raw.inspect}") unless raw.is_a?(Hash)
      unknown = raw.keys - CONCURRENCY_KEYS
      fail!(step_name, "concurrency: unknown key #{unknown.first.inspect} (known: key, limit)") if unknown.any?
      key, limit = raw.values_at("key", "limit")
      unless key.is_a?(String) && !key.empty? && key.bytesize <= 200
        fail!(step_name, "concurrency.key: expected a non-empty String (at most 200 bytes) such as " \
                         "\"%{context.customer_id}\", got #{key.inspect}")
      end
      stray = key.gsub(Queues::KEY_FIELD, "")
      if stray.include?("%{")
        fail!(step_name, "concurrency.key: only %{context.<path>} can be filled in, got #{key.inspect}")
      end
      fail!(step_name, "concurrency.limit: expected an Integer >= 1, got #{limit.inspect}") unless limit.is_a?(Integer) && limit >= 1

      { "key" => key.freeze, "limit" => limit }.freeze
    end

    def retry_policy(raw, step_name)
      raw ||= {}
      fail!(step_name, "retry: expected a mapping") unless raw.is_a?(Hash)
      unknown = raw.keys - RETRY_DEFAULTS.keys
      fail!(step_name, "retry: unknown key #{unknown.first.inspect}") if unknown.any?
      p = RETRY_DEFAULTS.merge(raw)
      fail!(step_name, "retry.retryable: expected true or false") unless [true, false].include?(p["retryable"])
      %w[max_attempts backoff_base_ms backoff_cap_ms].each do |k|
        min = k == "max_attempts" ? 1 : 0
        fail!(step_name, "retry.#{k}: expected an Integer >= #{min}") unless p[k].is_a?(Integer) && p[k] >= min
      end
      unless p["jitter"].is_a?(Numeric) && p["jitter"].between?(0, 1)
        fail!(step_name, "retry.jitter: expected a number between 0 and 1")
      end
      { retryable: p["retryable"], max_attempts: p["max_attempts"], backoff_base_ms: p["backoff_base_ms"],
        backoff_cap_ms: p["backoff_cap_ms"], jitter: p["jitter"].to_f }
    end

    def check_handler!(handler, step_name)
      defined = begin
        Object.const_defined?(handler)
      rescue NameError
        false
      end
      fail!(step_name, "handler #{handler} is not defined in this process (validate_handlers: true)") unless defined
    end

    def default_timeout_ms
      TaskerCore.config.worker["step_timeout_ms"]
    end

    # Unknown dependencies, then cycles (depth-first, naming the cycle).
    def check_dag!
      by_name = steps.to_h { |s| [s.name, s] }
      steps.each do |s|
        s.depends_on.each do |d|
          fail!(s.name, %(depends_on: unknown step "#{d}")) unless by_name.key?(d)
          fail!(s.name, "depends on itself") if d == s.name
        end
      end
      state = {}
      visit = lambda do |name, trail|
        return if state[name] == :done
        if state[name] == :active
          cycle = trail[trail.index(name)..] + [name]
          fail!(name, "dependency cycle: #{cycle.join(' -> ')}")
        end
        state[name] = :active
        by_name[name].depends_on.each { |d| visit.call(d, trail + [name]) }
        state[name] = :done
      end
      steps.each { |s| visit.call(s.name, []) }
    end
  end
end
