# frozen_string_literal: true

require "erb"
require "json"
require "rack"
require "tasker_core"
require_relative "web/chart"
require_relative "web/csrf"
require_relative "web/dag"
require_relative "web/display"
require_relative "web/metrics"
require_relative "web/queries"

module TaskerCore
  # The dashboard: a Rack app that reads the store and steers it through the
  # same functions as the Ruby API (TaskerCore::Tasks). Server-rendered ERB,
  # a few lines of plain JavaScript, no assets to build.
  #
  #   # config/routes.rb
  #   require "tasker_core/web"
  #   mount TaskerCore::Web => "/tasker"
  #
  #   # on its own: tasker web --port 9292
  #
  # TaskerCore::Web.read_only = true hides and refuses the actions;
  # TaskerCore::Web.new(read_only: true) is an app with its own setting.
  # POSTs need the page's CSRF token (tied to a signed cookie) and, when the
  # browser sends one, an Origin of this host. Authentication is the host
  # app's (README: Dashboard).
  class Web
    VIEWS = File.join(__dir__, "web", "views")
    PAGE_SIZE = 50

    class << self
      attr_writer :read_only
      # The HMAC key of the CSRF cookie; a random one per process when unset
      # (set it, or TASKER_WEB_SECRET, when several processes serve the dashboard).
      attr_writer :secret

      def read_only = @read_only || false
      def secret = @secret ||= ENV["TASKER_WEB_SECRET"] || SecureRandom.hex(32)

      # `mount TaskerCore::Web` and `run TaskerCore::Web` call the class.
      def call(env) = (@app ||= new).call(env)
    end

    def initialize(read_only: nil, secret: nil)
      @read_only = read_only
      @secret = secret
      @templates = {}
    end

    def read_only? = @read_only.nil? ? self.class.read_only : @read_only

    ROUTES = [
      ["GET", %r{\A/?\z}, :overview],
      ["GET", %r{\A/tasks/?\z}, :tasks],
      ["GET", %r{\A/tasks/(\d+)\z}, :task],
      ["GET", %r{\A/workers/?\z}, :workers],
      ["GET", %r{\A/metrics\z}, :metrics],
      ["POST", %r{\A/tasks/(\d+)/cancel\z}, :cancel_task],
      ["POST", %r{\A/tasks/(\d+)/retry_failed\z}, :retry_failed],
      ["POST", %r{\A/steps/(\d+)/retry\z}, :retry_step],
      ["POST", %r{\A/steps/(\d+)/resolve\z}, :resolve_step]
    ].freeze

    def call(env)
      Request.new(self, env, @secret || self.class.secret).dispatch
    end

    def template(name)
      @templates[name] ||= ERB.new(File.read(File.join(VIEWS, "#{name}.erb")), trim_mode: "-").tap do |erb|
        erb.filename = File.join(VIEWS, "#{name}.erb")
      end
    end

    # One request: routing, the pages and the actions. Views are rendered
    # with this object's binding, so they see its helpers (h, path, ...).
    class Request
      include ERB::Util
      include Display

      attr_reader :params, :notice

      def initialize(app, env, secret)
        @app = app
        @req = Rack::Request.new(env)
        @csrf = Csrf.new(@req, secret)
        @params = @req.GET
        @notice = @params["notice"]
      end

      def dispatch
        verb = @req.head? ? "GET" : @req.request_method
        path = @req.path_info.to_s
        ROUTES.each do |method, pattern, action|
          next unless method == verb && (m = pattern.match(path))

          return method == "POST" ? post(action, m[1]) : send(action, *m.captures)
        end
        text(404, "not found")
      rescue StoreError => e
        text(503, "the database is unavailable: #{e.message}")
      end

      def read_only? = @app.read_only?
      def csrf_token = @csrf.token

      # A link inside the dashboard, wherever it is mounted.
      def path(suffix = "", query = nil)
        base = "#{@req.script_name}/#{suffix.to_s.sub(%r{\A/}, '')}"
        query = query&.reject { |_, v| v.nil? || v.to_s.empty? }
        query && !query.empty? ? "#{base}?#{Rack::Utils.build_query(query)}" : base
      end

      private

      # ---- pages --------------------------------------------------------

      def overview
        @data = Store.with_connection { |c| Queries.overview(c, heartbeat_timeout_ms) }
        page("overview", "Overview")
      end

      def tasks
        @filters = Queries.task_filters(@params)
        @rows, @next_before = Store.with_connection { |c| Queries.tasks(c, @filters, limit: PAGE_SIZE) }
        page("tasks", "Tasks")
      end

      def task(id)
        @task = Store.with_connection { |c| Queries.task(c, Integer(id)) }
        return text(404, "there is no task #{id}") unless @task

        @dag = Dag.new(@task[:steps])
        page("task", "Task #{id}")
      end

      def workers
        @data = Store.with_connection { |c| Queries.workers(c, heartbeat_timeout_ms) }
        page("workers", "Workers")
      end

      def metrics
        body = Metrics.exposition(heartbeat_timeout_ms: heartbeat_timeout_ms)
        [200, { "content-type" => Metrics::CONTENT_TYPE, "cache-control" => "no-store" }, [body]]
      end

      # ---- actions ------------------------------------------------------

      def post(action, id)
        return text(403, "the dashboard is read-only") if read_only?
        return text(403, "refused: #{@csrf.refusal}") if @csrf.refusal

        send(action, Integer(id))
      end

      def cancel_task(id)
        ok = Tasks.cancel_task(id)
        back_to(id, ok ? "task #{id} cancelled" : "task #{id} was not cancelled: it has already finished")
      end

      def retry_failed(id)
        ids = Store.with_connection do |c|
          c.exec("SELECT id FROM tasker_workflow_steps WHERE task_id = $1 AND state = 'error' ORDER BY id", [id])
           .map { |r| r["id"] }
        end
        retried = ids.count { |s| Tasks.retry_step(s) }
        back_to(id, "#{retried} failed step#{'s' unless retried == 1} of task #{id} retried")
      end

      def retry_step(id)
        ok = Tasks.retry_step(id)
        back_to(task_of(id), ok ? "step #{id} retried" : "step #{id} was not retried: it is not in error")
      end

      def resolve_step(id)
        output = JSON.parse(@req.POST["output"].to_s)
        return text(422, "the output must be a JSON object") unless output.is_a?(Hash)

        ok = Tasks.resolve_step(id, output: output)
        back_to(task_of(id), ok ? "step #{id} resolved" : "step #{id} was not resolved: it has already finished")
      rescue JSON::ParserError => e
        text(422, "the output is not valid JSON: #{e.message.lines.first.strip[0, 200]}")
      end

      def task_of(step_id)
        Store.with_connection do |c|
          c.exec("SELECT task_id FROM tasker_workflow_steps WHERE id = $1", [step_id]).first&.fetch("task_id")
        end
      end

      # Post/redirect/get: the task page with the outcome.
      def back_to(task_id, notice)
        return text(404, notice) unless task_id

        [303, { "location" => path("tasks/#{task_id}", "notice" => notice) }, []]
      end

      # ---- rendering ----------------------------------------------------

      def page(view, title)
        @title = title
        @content = render(view)
        html = render("layout")
        headers = {
          "content-type" => "text/html; charset=utf-8", "cache-control" => "no-store",
          "content-security-policy" => "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; " \
                                       "script-src 'nonce-#{script_nonce}'; form-action 'self'; " \
                                       "frame-ancestors 'self'; base-uri 'none'",
          "x-content-type-options" => "nosniff", "referrer-policy" => "same-origin"
        }
        @csrf.set_cookie(headers)
        [200, headers, [html]]
      end

      def render(view) = @app.template(view).result(binding)

      def script_nonce = @script_nonce ||= SecureRandom.base64(16)

      def text(status, message)
        [status, { "content-type" => "text/plain; charset=utf-8", "x-content-type-options" => "nosniff" }, [message]]
      end

      def heartbeat_timeout_ms = TaskerCore.config.zeromq["heartbeat_timeout_ms"]
    end
  end
end
