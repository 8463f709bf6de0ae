# frozen_string_literal: true

module TaskerCore
  # Maps the handler names that travel in batches (class name strings) to
  # handler classes. A worker resolves a name once per step, from its pool
  # threads, so lookups are guarded by a mutex.
  class HandlerRegistry
    CONSTANT_PATH = /\A(?:::)?[A-Z]\w*(?:::[A-Z]\w*)*\z/.freeze

    # The registry a worker uses when none is given. It autoloads, so a
    # handler file that only defines its class is enough.
    def self.default
      @default ||= new(autoload: true)
    end

    def initialize(autoload: false)
      @autoload = autoload
      @handlers = {}
      @autoloaded = []
      @mutex = Mutex.new
    end

    # Forgets the classes found by constant lookup (not those registered by
    # hand), so the next step looks them up again: the Railtie calls it on
    # each code reload in development.
    def forget_autoloaded!
      @mutex.synchronize do
        @autoloaded.each { |name| @handlers.delete(name) }
        @autoloaded.clear
      end
      self
    end

    def autoload?
      @autoload
    end

    # register(MyHandler) or register("Name", MyHandler). A handler is a class
    # whose instances respond to #call(task, sequence, step); a new instance
    # runs each step so handlers need not be thread-safe. Anything else that
    # responds to #call (a lambda) is used as is and must be thread-safe.
    def register(name_or_class, klass = nil)
      name, handler = klass.nil? ? [name_or_class.name, name_or_class] : [name_or_class.to_s, klass]
      raise ArgumentError, "a handler needs a name (anonymous class given without one)" if name.nil? || name.empty?
      raise ArgumentError, "#{name}: handler must be a class with #call or respond to #call" unless handler?(handler)

      @mutex.synchronize { @handlers[name.delete_prefix("::")] = handler }
      handler
    end

    # The class (or callable) registered under name. With autoload, an
    # unregistered name is looked up as a constant and remembered.
    def resolve(name)
      key = self.class.key(name)
      found = @mutex.synchronize { @handlers[key] }
      return found if found

      raise UnknownHandlerError, "no handler registered as #{name.inspect}" unless @autoload

      handler = register(key, constant_handler(key))
      @mutex.synchronize { @autoloaded << key }
      handler
    end

    def registered?(name)
      @mutex.synchronize { @handlers.key?(self.class.key(name)) }
    end

    # The registry's key for a handler name: without a leading "::" (a
    # name that has none is used as it is, no copy made).
    def self.key(name)
      name = name.to_s
      name.start_with?("::") ? name.delete_prefix("::") : name
    end

    def names
      @mutex.synchronize { @handlers.keys }
    end

    # An object to #call for one step.
    def handler_for(name)
      handler = resolve(name)
      handler.is_a?(Class) ? handler.new : handler
    end

    private

    def constant_handler(name)
      raise UnknownHandlerError, "#{name.inspect} is not a constant name, so no handler can be loaded for it" unless CONSTANT_PATH.match?(name)

      handler = begin
        Object.const_get(name)
      rescue NameError => e
        # The first line only: Ruby's error_highlight appends a code snippet.
        raise UnknownHandlerError,
              "no handler registered as #{name.inspect} and no such constant (#{e.message.lines.first.chomp})"
      end
      # Steps name handlers by string, so only accept constants that really are
      # handlers: a step must not be able to instantiate an arbitrary class.
      raise UnknownHandlerError, "#{name} is not a step handler (a class with #call)" unless handler.is_a?(Class) && handler?(handler)

      handler
    end

    def handler?(handler)
      handler.is_a?(Class) ? handler.method_defined?(:call) : handler.respond_to?(:call)
    end
  end
end
