# frozen_string_literal: true

require "fileutils"
require "net/http"

# The dashboard specs: TaskerCore::Web mounted under /tasker in a real
# WEBrick server on a free port, and a real headless Chromium (Ferrum, over
# the DevTools protocol) looking at it. One server and one browser per file.
module WebHelpers
  SCREENSHOTS = File.join(SpecHelpers::ROOT, "tmp", "screenshots")
  MOUNT = "/tasker"

  class << self
    def start_server(**app_options)
      require "tasker_core/web"
      require "tasker_core/web/server"
      app = TaskerCore::Web.new(**app_options)
      mounted = Rack::URLMap.new(MOUNT => app)
      TaskerCore::Web::Server.new(mounted, port: 0).start
    end

    def start_browser
      require "ferrum"
      Ferrum::Browser.new(
        browser_path: ENV.fetch("TASKER_CHROMIUM", %w[/usr/bin/chromium /usr/bin/chromium-browser].find { |p| File.executable?(p) }),
        headless: true, timeout: 30, process_timeout: 30, window_size: [1360, 1000],
        # root in a container: Chromium's sandbox needs user namespaces it does not get
        browser_options: { "no-sandbox" => nil, "disable-dev-shm-usage" => nil }
      )
    end
  end

  def dashboard_url(path = "") = "#{@web_server.url}#{MOUNT}/#{path.sub(%r{\A/}, '')}"

  def visit(path = "")
    @browser.goto(dashboard_url(path))
    @browser.network.wait_for_idle(timeout: 10)
  end

  def screenshot(name)
    FileUtils.mkdir_p(SCREENSHOTS)
    @browser.screenshot(path: File.join(SCREENSHOTS, "#{name}.png"), full: true)
  end

  def texts(selector) = @browser.css(selector).map { |n| n.text.strip }

  # Clicks a link or a form's button (accepting any confirm() dialog) and
  # waits for the page it leads to.
  def click_and_wait(selector)
    before = @browser.current_url
    @browser.at_css(selector).scroll_into_view.click
    wait_until(message: "the page after clicking #{selector}") do
      @browser.current_url != before && @browser.evaluate("document.readyState") == "complete"
    end
    @browser.network.wait_for_idle(timeout: 10)
  end

  def http_get(path)
    Net::HTTP.get_response(URI(dashboard_url(path)))
  end

  def http_post(path, form, headers = {})
    uri = URI(dashboard_url(path))
    req = Net::HTTP::Post.new(uri, headers)
    req.set_form_data(form)
    Net::HTTP.start(uri.host, uri.port) { |h| h.request(req) }
  end
end

RSpec.configure do |config|
  config.include WebHelpers, :web
  config.before(:context, :web) do
    @web_server = WebHelpers.start_server(**(self.class.metadata[:web_app] || {}))
    @browser = WebHelpers.start_browser
    @browser.on(:dialog) { |dialog| dialog.accept }
  end
  config.after(:context, :web) do
    @browser&.quit
    @web_server&.stop
  end
end
