# frozen_string_literal: true

require "tmpdir"

RSpec.describe TaskerCore::TaskTemplate do
  around do |example|
    Dir.mktmpdir { |dir| @dir = dir; example.run }
  end

  def write(name, yaml)
    File.join(@dir, name).tap { |p| File.write(p, yaml) }
  end

  def steps_yaml(*lines) = "name: t\nsteps:\n#{lines.join("\n")}\n"

  it "loads a template with defaults" do
    path = write("ok.yml", steps_yaml("  - {name: a, handler: SpecHandlers::Noop}",
                                      "  - {name: b, handler: SpecHandlers::Noop, depends_on: [a], timeout_ms: 50, " \
                                      "retry: {max_attempts: 5}}"))
    t = described_class.load_file(path)
    expect([t.namespace, t.name, t.version]).to eq(%w[default t 0.1.0])
    expect(t.step("a").timeout_ms).to eq(TaskerCore.config.worker["step_timeout_ms"])
    expect(t.step("b").to_h).to include(depends_on: ["a"], timeout_ms: 50, max_attempts: 5, retryable: true,
                                        backoff_base_ms: 500, backoff_cap_ms: 30_000, jitter: 0.2)
  end

  {
    "a cycle" => [nil, ["  - {name: a, handler: SpecHandlers::Noop, depends_on: [c]}",
                                     "  - {name: b, handler: SpecHandlers::Noop, depends_on: [a]}",
                                     "  - {name: c, handler: SpecHandlers::Noop, depends_on: [b]}"],
                  /step "a": dependency cycle: a -> c -> b -> a/],
    "an unknown dependency" => [nil, ["  - {name: a, handler: SpecHandlers::Noop, depends_on: [ghost]}"],
                                /step "a": depends_on: unknown step "ghost"/],
    "a duplicate step name" => [nil, ["  - {name: a, handler: SpecHandlers::Noop}",
                                      "  - {name: a, handler: SpecHandlers::Other}"], /step "a": duplicate step name/],
    "a bad retry policy" => [nil, ["  - {name: a, handler: SpecHandlers::Noop, retry: {jitter: 2}}"],
                             /step "a": retry.jitter/]
  }.each do |what, (_, lines, message)|
    it "rejects #{what}, naming the file and the step" do
      path = write("bad.yml", steps_yaml(*lines))
      expect { described_class.load_file(path) }
        .to raise_error(TaskerCore::ConfigurationError, /#{Regexp.escape(path)}/) { |e| expect(e.message).to match(message) }
    end
  end

  it "loads a template whose handler class this process does not define (workers check handlers)" do
    path = write("lazy.yml", steps_yaml("  - {name: a, handler: Later::Handler}"))
    expect(described_class.load_file(path).step("a").handler).to eq("Later::Handler")
    expect(TaskerCore::TaskTemplateRegistry.new(dir: File.dirname(path)).find(name: "t").step("a").handler)
      .to eq("Later::Handler")
  end

  it "checks handler classes only when asked (validate_handlers: true)" do
    path = write("strict.yml", steps_yaml("  - {name: a, handler: Nowhere::Handler}"))
    expect { described_class.load_file(path, validate_handlers: true) }
      .to raise_error(TaskerCore::ConfigurationError, /step "a": handler Nowhere::Handler is not defined in this process/)
  end

  it "rejects an invalid context_schema and invalid YAML" do
    path = write("schema.yml", "name: t\ncontext_schema: {type: nope}\nsteps: [{name: a, handler: SpecHandlers::Noop}]\n")
    expect { described_class.load_file(path) }.to raise_error(TaskerCore::ConfigurationError, /context_schema/)
    path = write("broken.yml", "name: [\n")
    expect { described_class.load_file(path) }.to raise_error(TaskerCore::ConfigurationError, /not valid YAML/)
  end

  describe TaskerCore::TaskTemplateRegistry do
    it "loads a folder and finds by namespace, name and version (highest by default)" do
      write("a.yml", "name: t\nversion: 1.2.0\nsteps: [{name: a, handler: SpecHandlers::Noop}]\n")
      write("b.yml", "name: t\nversion: 1.10.0\nsteps: [{name: a, handler: SpecHandlers::Noop}]\n")
      write("c.yml", "name: t\nnamespace: other\nsteps: [{name: a, handler: SpecHandlers::Noop}]\n")
      registry = described_class.new(dir: @dir)
      expect(registry.find(name: "t").version).to eq("1.10.0")
      expect(registry.find(name: "t", version: "1.2.0").version).to eq("1.2.0")
      expect(registry.find(name: "t", namespace: "other").namespace).to eq("other")
      expect { registry.find(name: "t", version: "9") }.to raise_error(TaskerCore::ConfigurationError, /t@9/)
    end

    it "reads the folder from tasks.template_dir relative to the app root" do
      config = TaskerCore::Config.load(overrides: { tasks: { template_dir: @dir } })
      write("a.yml", "name: from_config\nsteps: [{name: a, handler: SpecHandlers::Noop}]\n")
      expect(described_class.from_config(config).find(name: "from_config").path).to eq(File.join(@dir, "a.yml"))
    end
  end
end
