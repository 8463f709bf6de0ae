# frozen_string_literal: true

require "spec_helper"
require "tasker_core/web"
require "rack/auth/basic"

# The README's way to require a login for the dashboard: Rack middleware
# around the app (as in a config.ru or a Rails route).
RSpec.describe "TaskerCore::Web behind Rack::Auth::Basic", :db do
  let(:app) do
    Rack::Builder.new do
      use Rack::Auth::Basic, "tasker" do |user, password|
        Rack::Utils.secure_compare(user, "ops") & Rack::Utils.secure_compare(password, "s3cret")
      end
      map("/tasker") { run TaskerCore::Web }
    end
  end

  it "answers 401 without the credentials and the page with them" do
    request = Rack::MockRequest.new(app)
    expect(request.get("/tasker/tasks").status).to eq(401)
    expect(request.get("/tasker/tasks", "HTTP_AUTHORIZATION" => "Basic #{['ops:wrong'].pack('m0')}").status).to eq(401)
    page = request.get("/tasker/tasks", "HTTP_AUTHORIZATION" => "Basic #{['ops:s3cret'].pack('m0')}")
    expect(page.status).to eq(200)
    expect(page.body).to include(%(<a href="/tasker/workers">Workers</a>))
  end
end
