# frozen_string_literal: true

module TaskerCore
  # What a worker runs around every handler call (the handler's lookup and
  # #call). Anything that responds to #call and yields, like Sidekiq's
  # reloader option:
  #
  #   TaskerCore.handler_wrapper = ->(&run) { MyLibrary.around_job { run.call } }
  #
  # Under Rails the Railtie sets it to the application's reloader (which runs
  # the executor): ActiveRecord connections a handler takes go back to the
  # pool when it returns, and changed code is reloaded before the next step
  # in development. The default just yields.
  module HandlerWrapper
    # The default: no wrapping.
    DIRECT = ->(&run) { run.call }

    # Rails.application.reloader.wrap around each handler call (what
    # Sidekiq::Rails::Reloader does for a job).
    class RailsReloader
      def initialize(app) = @app = app

      def call(&run)
        options = ::Rails::VERSION::STRING >= "7.1" ? { source: "tasker_core.step" } : {}
        @app.reloader.wrap(**options, &run)
      end

      # A handler lookup outside a step (the worker checking that it has a
      # step's handler before accepting it): the executor only, so the
      # caller never waits to reload code while steps run.
      def lookup(&block) = @app.executor.wrap(&block)

      def inspect = "#<#{self.class.name} app=#{@app.class.name}>"
    end
  end

  @handler_wrapper = nil

  class << self
    attr_writer :handler_wrapper

    def handler_wrapper = @handler_wrapper || HandlerWrapper::DIRECT

    # True once an app set a wrapper (the Railtie then keeps it).
    def handler_wrapper_set? = !@handler_wrapper.nil?

    # Runs the block inside handler_wrapper; returns the block's value.
    def wrap_handler(&block)
      return yield if @handler_wrapper.nil? # HandlerWrapper::DIRECT, without its closures

      result = nil
      handler_wrapper.call { result = block.call }
      result
    end

    # A handler lookup outside a step: handler_wrapper#lookup when it has
    # one, else handler_wrapper.
    def wrap_handler_lookup(&block)
      wrapper = handler_wrapper
      return wrap_handler(&block) unless wrapper.respond_to?(:lookup)

      result = nil
      wrapper.lookup { result = block.call }
      result
    end
  end
end
