# frozen_string_literal: true

require "fileutils"
require "pathname"
require "stringio"
require "tmpdir"

RSpec.describe TaskerCore::Config do
  # Every variable the configuration reads: cleared for each example, restored after.
  env_vars = %w[TASKER_ENV RAILS_ENV RACK_ENV TASKER_CONFIG_PATH TASKER_BATCH_ENDPOINT
                TASKER_RESULT_ENDPOINT DATABASE_URL TASKER_LOG_LEVEL].freeze

  around do |example|
    saved = env_vars.to_h { |v| [v, ENV.delete(v)] }
    # Whatever an earlier spec file installed is not this example's.
    TaskerCore.reset_config!
    TaskerCore.logger = nil
    Dir.mktmpdir("tasker-config") do |dir|
      @tmp = dir
      example.run
    end
  ensure
    saved.each { |k, v| v.nil? ? ENV.delete(k) : ENV[k] = v }
    TaskerCore.reset_config!
    TaskerCore.logger = nil
  end

  # Writes a YAML file in the example's temp dir and returns its path.
  def write_config(text, name: "tasker-config.yml")
    path = File.join(@tmp, name)
    FileUtils.mkdir_p(File.dirname(path))
    File.write(path, text)
    path
  end

  def load_yaml(text, env: "development", **opts)
    described_class.load(path: write_config(text), env: env, **opts)
  end

  def nested(flat)
    flat.each_with_object({}) do |(key, value), out|
      *parents, leaf = key.split(".")
      parents.inject(out) { |h, k| h[k] ||= {} }[leaf] = value
    end
  end

  def error_for(text = nil, env: "development", **opts)
    path = text && write_config(text)
    described_class.load(path: path, env: env, **opts)
    raise "expected a ConfigurationError"
  rescue TaskerCore::ConfigurationError => e
    e.message
  end

  describe "defaults" do
    it "gives every schema default when the file sets nothing" do
      config = load_yaml("default:\n")
      expect(config.to_h).to eq(nested(described_class.defaults))
      expect(config.dig("zeromq", "batch_endpoint")).to eq("tcp://127.0.0.1:5555")
      expect(config.dig("zeromq", "result_endpoint")).to eq("tcp://127.0.0.1:5556")
      expect(config.zeromq["enabled"]).to be(true)
      expect(config.worker["max_workers"]).to eq(10)
      expect(config.orchestration["batch_size"]).to eq(100)
      expect(config.database["url"]).to be_nil
      expect(config.logging["level"]).to eq("info")
    end

    it "accepts an empty file" do
      expect(load_yaml("").to_h).to eq(nested(described_class.defaults))
    end

    it "ships a default file whose default: section spells out exactly the schema defaults" do
      shipped = YAML.safe_load(File.read(described_class::DEFAULT_PATH), aliases: true)
      expect(shipped["default"]).to eq(nested(described_class.defaults))
    end

    it "applies the shipped file's environment sections" do
      path = described_class::DEFAULT_PATH
      expect(described_class.load(path: path, env: "development").logging["level"]).to eq("debug")
      expect(described_class.load(path: path, env: "test").logging["level"]).to eq("warn")
      expect(described_class.load(path: path, env: "production").database["statement_timeout_ms"]).to eq(60_000)
    end

    it "uses the default: section alone for an environment the file does not mention" do
      config = load_yaml("default:\n  worker:\n    max_workers: 3\n", env: "staging")
      expect(config.environment).to eq("staging")
      expect(config.worker["max_workers"]).to eq(3)
    end
  end

  describe "the Config object" do
    let(:config) { load_yaml("default:\n  database:\n    url: postgres://u:s3cret@db/app\n") }

    it "is frozen all the way down, with string keys" do
      expect(config).to be_frozen
      expect(config.to_h).to be_frozen
      expect(config.zeromq).to be_frozen
      expect(config.dig("zeromq", "batch_endpoint")).to be_frozen
      expect(config.environment).to be_frozen
      expect { config.worker["max_workers"] = 1 }.to raise_error(FrozenError)
      expect(config.to_h.keys).to all(be_a(String))
    end

    it "reads with strings or symbols" do
      expect(config[:worker]).to equal(config["worker"])
      expect(config.dig(:zeromq, :send_hwm)).to eq(1000)
      expect(config.dig("zeromq", "nope")).to be_nil
    end

    it "keeps the database password out of #inspect" do
      expect(config.inspect).not_to include("s3cret")
      expect(config.inspect).to include("postgres://u:[FILTERED]@db/app")
      expect(config.database["url"]).to eq("postgres://u:s3cret@db/app")
    end

    it "cannot be built without loading" do
      expect { described_class.new({}, environment: "x", path: "y") }.to raise_error(NoMethodError)
    end
  end

  describe "environment selection" do
    [
      [{ "TASKER_ENV" => "t", "RAILS_ENV" => "r", "RACK_ENV" => "k" }, "t"],
      [{ "RAILS_ENV" => "r", "RACK_ENV" => "k" }, "r"],
      [{ "TASKER_ENV" => "", "RAILS_ENV" => "r" }, "r"],
      [{ "RACK_ENV" => "k" }, "k"],
      [{}, "development"]
    ].each do |vars, expected|
      it "picks #{expected.inspect} from #{vars.inspect}" do
        vars.each { |k, v| ENV[k] = v }
        path = write_config("default:\n  worker:\n    max_workers: 1\n#{expected}:\n  worker:\n    max_workers: 7\n")
        config = described_class.load(path: path)
        expect(config.environment).to eq(expected)
        expect(config.worker["max_workers"]).to eq(7)
      end
    end

    it "prefers env: over the environment variables" do
      ENV["TASKER_ENV"] = "production"
      expect(load_yaml("", env: "test").environment).to eq("test")
    end
  end

  describe "file selection" do
    it "reads TASKER_CONFIG_PATH first" do
      ENV["TASKER_CONFIG_PATH"] = write_config("default:\n  worker:\n    max_workers: 4\n", name: "elsewhere.yml")
      write_config("default:\n  worker:\n    max_workers: 5\n", name: "config/tasker-config.yml")
      Dir.chdir(@tmp) do
        config = described_class.load
        expect(config.path).to eq(ENV["TASKER_CONFIG_PATH"])
        expect(config.worker["max_workers"]).to eq(4)
      end
    end

    it "fails when TASKER_CONFIG_PATH names a missing file" do
      ENV["TASKER_CONFIG_PATH"] = File.join(@tmp, "missing.yml")
      message = error_for
      expect(message).to include(File.join(@tmp, "missing.yml"), "TASKER_CONFIG_PATH", "not found")
    end

    it "reads config/tasker-config.yml under the current directory next" do
      path = write_config("default:\n  worker:\n    max_workers: 5\n", name: "config/tasker-config.yml")
      Dir.chdir(@tmp) do
        config = described_class.load
        expect(File.realpath(config.path)).to eq(File.realpath(path))
        expect(config.worker["max_workers"]).to eq(5)
      end
    end

    it "reads config/tasker-config.yml under Rails.root when Rails defines it" do
      app = File.join(@tmp, "app")
      write_config("default:\n  worker:\n    max_workers: 6\n", name: "app/config/tasker-config.yml")
      rails = Module.new
      rails.define_singleton_method(:root) { Pathname.new(app) }
      stub_const("Rails", rails)
      Dir.chdir(@tmp) do
        expect(described_class.load.worker["max_workers"]).to eq(6)
      end
    end

    it "falls back to the gem's default file" do
      Dir.chdir(@tmp) do
        expect(described_class.load.path).to eq(described_class::DEFAULT_PATH)
      end
    end
  end

  describe "merging" do
    it "deep-merges the environment section over default:" do
      config = load_yaml(<<~YAML, env: "production")
        default:
          zeromq:
            send_hwm: 5
            recv_hwm: 6
        production:
          zeromq:
            send_hwm: 7
          worker:
      YAML
      expect(config.zeromq).to include("send_hwm" => 7, "recv_hwm" => 6, "linger_ms" => 1000)
      expect(config.worker["max_workers"]).to eq(10)
    end

    it "follows Rails-style <<: *default aliases" do
      config = load_yaml(<<~YAML, env: "test")
        default: &default
          orchestration:
            batch_size: 50
        test:
          <<: *default
          worker:
            max_workers: 2
      YAML
      expect(config.orchestration["batch_size"]).to eq(50)
      expect(config.worker["max_workers"]).to eq(2)
    end

    it "runs ERB first" do
      config = load_yaml("default:\n  worker:\n    max_workers: <%= 3 * 4 %>\n  logging:\n    level: <%= %w[warn].first %>\n")
      expect(config.worker["max_workers"]).to eq(12)
      expect(config.logging["level"]).to eq("warn")
    end

    it "lets environment variables override endpoints, database.url and logging.level" do
      ENV["TASKER_BATCH_ENDPOINT"] = "ipc:///tmp/batches"
      ENV["TASKER_RESULT_ENDPOINT"] = "tcp://*:7001"
      ENV["DATABASE_URL"] = "postgres:///from_env"
      ENV["TASKER_LOG_LEVEL"] = "error"
      config = load_yaml(<<~YAML)
        default:
          zeromq:
            batch_endpoint: tcp://10.0.0.1:1
            result_endpoint: tcp://10.0.0.1:2
          database:
            url: postgres:///from_file
      YAML
      expect(config.zeromq).to include("batch_endpoint" => "ipc:///tmp/batches", "result_endpoint" => "tcp://*:7001")
      expect(config.database["url"]).to eq("postgres:///from_env")
      expect(config.logging["level"]).to eq("error")
    end

    it "ignores empty environment variables" do
      ENV["DATABASE_URL"] = ""
      expect(load_yaml("default:\n  database:\n    url: postgres:///f\n").database["url"]).to eq("postgres:///f")
    end

    it "applies overrides last, with symbol or string keys" do
      ENV["TASKER_BATCH_ENDPOINT"] = "tcp://127.0.0.1:9000"
      config = load_yaml("", overrides: { zeromq: { batch_endpoint: "inproc://b" }, "worker" => { "max_workers" => 1 } })
      expect(config.zeromq["batch_endpoint"]).to eq("inproc://b")
      expect(config.worker["max_workers"]).to eq(1)
      expect(config.zeromq["result_endpoint"]).to eq("tcp://127.0.0.1:5556")
    end
  end

  describe "errors" do
    it "names a missing file" do
      expect { described_class.load(path: File.join(@tmp, "nope.yml")) }
        .to raise_error(TaskerCore::ConfigurationError, /#{Regexp.escape(File.join(@tmp, "nope.yml"))}.*not found/)
    end

    it "names a file that is not YAML" do
      message = error_for("default:\n  zeromq: [1,\n")
      expect(message).to include(File.join(@tmp, "tasker-config.yml"), "not valid YAML")
    end

    it "names a file whose ERB fails" do
      message = error_for("default:\n  worker:\n    max_workers: <%= no_such_method %>\n")
      expect(message).to include(File.join(@tmp, "tasker-config.yml"), "ERB failed", "NameError", "no_such_method")
    end

    it "refuses YAML that makes objects other than plain data" do
      message = error_for("default:\n  database:\n    url: 2024-01-01\n")
      expect(message).to include("not valid YAML", "Date")
    end

    it "refuses a file that is not a mapping" do
      expect(error_for("- 1\n- 2\n")).to include("(top level)", "expected a mapping", "got [1, 2] (Array)")
    end

    it "says settings belong in a section when a section name is at the top level" do
      expect(error_for("zeromq:\n  send_hwm: 1\n")).to include("zeromq:", "under default:")
    end

    it "refuses an environment section that is not a mapping" do
      expect(error_for("production: 5\n")).to include("production: expected a mapping of settings, got 5 (Integer)")
    end

    it "names the file, section, dotted key and expectation for a wrong type" do
      message = error_for("production:\n  zeromq:\n    send_hwm: abc\n", env: "production")
      expect(message).to eq("Invalid tasker_core configuration in #{File.join(@tmp, 'tasker-config.yml')} " \
                            "(section \"production\"): zeromq.send_hwm: expected an Integer >= 0, got \"abc\" (String)")
    end

    it "names the default: section when the bad value is there" do
      expect(error_for("default:\n  zeromq:\n    enabled: 1\n"))
        .to include('(section "default")', "zeromq.enabled: expected true or false, got 1 (Integer)")
    end

    it "ignores sections of other environments" do
      expect(load_yaml("production:\n  zeromq:\n    send_hwm: abc\n", env: "test").zeromq["send_hwm"]).to eq(1000)
    end

    [
      ["zeromq.send_hwm", -1, "expected an Integer >= 0, got -1 (Integer)"],
      ["zeromq.linger_ms", -2, "expected an Integer >= -1, got -2 (Integer)"],
      ["worker.max_workers", 0, "expected an Integer between 1 and 1024, got 0 (Integer)"],
      ["worker.step_timeout_ms", 1.5, "expected an Integer >= 1, got 1.5 (Float)"],
      ["orchestration.batch_size", 10_001, "expected an Integer between 1 and 10000, got 10001 (Integer)"],
      ["database.url", "", "expected a non-empty String or null, got \"\" (String)"],
      ["database.pool", true, "expected an Integer between 1 and 1000, got true (TrueClass)"],
      ["logging.level", "verbose", 'expected one of "debug", "info", "warn", "error", got "verbose" (String)'],
      ["zeromq.enabled", nil, "expected true or false, got nil (NilClass)"]
    ].each do |key, value, expected|
      it "refuses #{key} = #{value.inspect}" do
        message = error_for("", overrides: nested(key => value))
        expect(message).to include("(overrides)", "#{key}: #{expected}")
      end
    end

    it "refuses a setting given a mapping" do
      expect(error_for("default:\n  zeromq:\n    send_hwm:\n      a: 1\n"))
        .to include('zeromq.send_hwm: expected an Integer >= 0, got {"a"=>1} (Hash)')
    end

    it "refuses a section given a value" do
      expect(error_for("default:\n  worker: 3\n")).to include("worker: expected a mapping of settings, got 3 (Integer)")
    end

    it "refuses unknown keys at every level, suggesting the nearest" do
      expect(error_for("default:\n  zeromqq:\n    send_hwm: 1\n"))
        .to include('(section "default")', "zeromqq: unknown key (did you mean zeromq?)")
      expect(error_for("test:\n  zeromq:\n    send_hmw: 1\n", env: "test"))
        .to include('(section "test")', "zeromq.send_hmw: unknown key (did you mean zeromq.send_hwm?)")
      expect(error_for("default:\n  zeromq:\n    batch_size: 1\n"))
        .to include("zeromq.batch_size: unknown key (did you mean orchestration.batch_size?)")
      expect(error_for("", overrides: { worker: { quux: 1 } })).to match(/worker\.quux: unknown key\z/)
    end

    valid = ["tcp://127.0.0.1:5555", "tcp://*:*", "tcp://localhost:65535", "tcp://[::1]:1", "tcp://eth0:80",
             "ipc:///tmp/tasker.sock", "ipc://@abstract", "inproc://results"]
    invalid = ["tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://:5555", "tcp://h:p",
               "127.0.0.1:5555", "udp://127.0.0.1:5555", "ipc://", "inproc://", "inproc://a b", 5555]
    valid.each do |endpoint|
      it "accepts the endpoint #{endpoint}" do
        expect(load_yaml("", overrides: { zeromq: { batch_endpoint: endpoint } }).zeromq["batch_endpoint"]).to eq(endpoint)
      end
    end
    invalid.each do |endpoint|
      it "refuses the endpoint #{endpoint.inspect}" do
        message = error_for("", overrides: { zeromq: { result_endpoint: endpoint } })
        expect(message).to include("zeromq.result_endpoint: expected an endpoint tcp://host:port (port 1..65535 or *), " \
                                   "ipc://path or inproc://name, got #{endpoint.inspect}")
      end
    end

    it "names the environment variable that set a bad endpoint" do
      ENV["TASKER_BATCH_ENDPOINT"] = "localhost:5555"
      expect(error_for(""))
        .to include("(environment variable TASKER_BATCH_ENDPOINT)", 'zeromq.batch_endpoint: expected an endpoint', '"localhost:5555"')
    end

    it "requires heartbeat_timeout_ms to exceed heartbeat_interval_ms" do
      message = error_for("production:\n  zeromq:\n    heartbeat_interval_ms: 5000\n", env: "production")
      expect(message).to include('(environment "production")',
                                 "zeromq.heartbeat_timeout_ms: expected more than zeromq.heartbeat_interval_ms (5000), got 5000")
    end
  end

  describe "TaskerCore.config" do
    it "loads once and memoizes a frozen Config" do
      ENV["TASKER_CONFIG_PATH"] = write_config("default:\n  worker:\n    max_workers: 8\n")
      first = TaskerCore.config
      expect(first).to be_a(described_class).and be_frozen
      expect(first.worker["max_workers"]).to eq(8)
      File.write(ENV["TASKER_CONFIG_PATH"], "default:\n  worker:\n    max_workers: 9\n")
      expect(TaskerCore.config).to equal(first)
      TaskerCore.reset_config!
      expect(TaskerCore.config.worker["max_workers"]).to eq(9)
    end

    it "is replaced by configure and config=" do
      path = write_config("test:\n  worker:\n    max_workers: 3\n")
      returned = TaskerCore.configure(path: path, env: "test", overrides: { orchestration: { batch_size: 7 } })
      expect(TaskerCore.config).to equal(returned)
      expect(TaskerCore.config.worker["max_workers"]).to eq(3)
      expect(TaskerCore.config.orchestration["batch_size"]).to eq(7)

      other = described_class.load(path: path, env: "development")
      TaskerCore.config = other
      expect(TaskerCore.config).to equal(other)
      expect { TaskerCore.config = { "worker" => {} } }.to raise_error(TypeError, /TaskerCore::Config/)
    end

    it "raises ConfigurationError on first use when the file is bad" do
      ENV["TASKER_CONFIG_PATH"] = write_config("default:\n  nope: 1\n")
      expect { TaskerCore.config }.to raise_error(TaskerCore::ConfigurationError, /nope: unknown key/)
    end
  end

  describe "TaskerCore.logger" do
    it "is one stdlib Logger whose level follows logging.level" do
      TaskerCore.configure(path: write_config("default:\n  logging:\n    level: warn\n"))
      logger = TaskerCore.logger
      expect(logger).to be_a(Logger)
      expect(TaskerCore.logger).to equal(logger)
      expect(logger.level).to eq(Logger::WARN)
      expect(logger.progname).to eq("tasker_core")

      TaskerCore.configure(path: write_config("default:\n  logging:\n    level: debug\n"))
      expect(TaskerCore.logger).to equal(logger)
      expect(logger.level).to eq(Logger::DEBUG)
    end

    it "uses a logger the application sets, leaving its level alone" do
      io = StringIO.new
      mine = Logger.new(io, level: :error)
      TaskerCore.logger = mine
      TaskerCore.configure(path: write_config("default:\n  logging:\n    level: debug\n"))
      expect(TaskerCore.logger).to equal(mine)
      expect(mine.level).to eq(Logger::ERROR)
      TaskerCore.logger.error("boom")
      expect(io.string).to include("boom")

      TaskerCore.logger = nil
      expect(TaskerCore.logger).not_to equal(mine)
      expect(TaskerCore.logger.level).to eq(Logger::DEBUG)
    end

    it "still works when the configuration is bad" do
      ENV["TASKER_CONFIG_PATH"] = write_config("default:\n  nope: 1\n")
      expect(TaskerCore.logger.level).to eq(Logger::INFO)
    end
  end

  describe "generated docs" do
    it "are what the generator writes from the schema (rake docs, bin/sync-docs)" do
      expect(described_class.sync_docs(SpecHelpers::ROOT, write: false)).to eq([]),
                                                                            "out of date: run rake docs"
    end

    it "list in docs/protocol.md section 13 every key that matters on the wire, with its default" do
      doc = File.read(File.join(SpecHelpers::ROOT, "docs", "protocol.md"))
      table = doc[/<!-- protocol-settings:begin -->\n(.*)\n<!-- protocol-settings:end -->/m, 1]
      expect(table).to eq(described_class.protocol_table)
      keys = described_class::SCHEMA.values.select(&:protocol).map(&:key)
      expect(keys).to include("zeromq.max_result_bytes", "worker.step_timeout_ms", "orchestration.dispatch_timeout_ms")
      keys.each { |k| expect(table).to include("`#{k}` | #{described_class::SCHEMA[k].default.nil? ? 'null' : "`#{described_class::SCHEMA[k].default}`"} |") }
    end

    it "finds a stale region and rewrites it" do
      Dir.mktmpdir do |root|
        FileUtils.mkdir_p(File.join(root, "docs"))
        described_class.generated_docs.each_key do |rel|
          FileUtils.cp(File.join(SpecHelpers::ROOT, rel), File.join(root, rel))
        end
        stale = File.join(root, "docs", "protocol.md")
        File.write(stale, File.read(stale).sub("| `zeromq.max_payload_depth` | `24` |", "| `zeromq.max_payload_depth` | `28` |"))
        expect(described_class.sync_docs(root, write: false)).to eq(["docs/protocol.md"])
        expect(described_class.sync_docs(root)).to eq(["docs/protocol.md"])
        expect(described_class.sync_docs(root, write: false)).to eq([])
      end
    end
  end

  ["docs/configuration.md", "README.md"].each do |doc_path|
  describe doc_path do
    let(:doc) { File.read(File.expand_path("../../#{doc_path}", __dir__)) }

    it "mentions every key, its default and its environment variable" do
      described_class::SCHEMA.each_value do |setting|
        expect(doc).to include("`#{setting.key}`")
        expect(doc).to include("`#{setting.env}`") if setting.env
      end
    end

    it "holds the table generated from the schema" do
      table = doc[/<!-- settings:begin -->\n(.*)\n<!-- settings:end -->/m, 1]
      expect(table).to eq(described_class.reference_table),
                       "#{doc_path} is out of date; regenerate the table with " \
                       "bin/sync-docs"
    end
  end
  end
end
