# frozen_string_literal: true

module RegistrySpecHandlers
  class Greeter < TaskerCore::StepHandler
    def call(task, _sequence, _step)
      { "hello" => task.id }
    end
  end

  class NotAHandler; end
end

RSpec.describe TaskerCore::HandlerRegistry do
  subject(:registry) { described_class.new }

  it "registers a class under its name and resolves it" do
    registry.register(RegistrySpecHandlers::Greeter)
    expect(registry.resolve("RegistrySpecHandlers::Greeter")).to eq(RegistrySpecHandlers::Greeter)
    expect(registry.resolve("::RegistrySpecHandlers::Greeter")).to eq(RegistrySpecHandlers::Greeter)
    expect(registry.names).to eq(["RegistrySpecHandlers::Greeter"])
  end

  it "registers under an explicit name, lambdas included" do
    callable = ->(_t, _s, _st) { {} }
    registry.register("Short", RegistrySpecHandlers::Greeter)
    registry.register("Inline", callable)
    expect(registry.resolve("Short")).to eq(RegistrySpecHandlers::Greeter)
    expect(registry.handler_for("Inline")).to equal(callable)
    expect(registry.handler_for("Short")).to be_a(RegistrySpecHandlers::Greeter)
  end

  it "gives a fresh handler instance per step" do
    registry.register(RegistrySpecHandlers::Greeter)
    expect(registry.handler_for("RegistrySpecHandlers::Greeter"))
      .not_to equal(registry.handler_for("RegistrySpecHandlers::Greeter"))
  end

  it "raises UnknownHandlerError for an unregistered name" do
    expect { registry.resolve("RegistrySpecHandlers::Greeter") }
      .to raise_error(TaskerCore::UnknownHandlerError, /RegistrySpecHandlers::Greeter/)
  end

  it "names a missing constant in one line (no code snippet in the logs)" do
    expect { described_class.new(autoload: true).resolve("RegistrySpecHandlers::Missing") }
      .to raise_error(TaskerCore::UnknownHandlerError) { |e|
        expect(e.message).to eq('no handler registered as "RegistrySpecHandlers::Missing" and no such constant ' \
                                "(uninitialized constant RegistrySpecHandlers::Missing)")
      }
  end

  it "refuses things that cannot run a step" do
    expect { registry.register(RegistrySpecHandlers::NotAHandler) }.to raise_error(ArgumentError, /call/)
    expect { registry.register(Class.new { def call(*) = {} }) }.to raise_error(ArgumentError, /name/)
  end

  context "with autoload" do
    subject(:registry) { described_class.new(autoload: true) }

    it "loads a handler by constant name and remembers it" do
      expect(registry.resolve("RegistrySpecHandlers::Greeter")).to eq(RegistrySpecHandlers::Greeter)
      expect(registry.registered?("RegistrySpecHandlers::Greeter")).to be(true)
    end

    it "does not instantiate constants that are not handlers, or names that are not constants" do
      %w[RegistrySpecHandlers::NotAHandler Kernel NoSuchThing::AtAll system("id") lowercase].each do |name|
        expect { registry.resolve(name) }.to raise_error(TaskerCore::UnknownHandlerError)
      end
    end
  end
end
