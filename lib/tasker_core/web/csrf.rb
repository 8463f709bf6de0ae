# frozen_string_literal: true

require "openssl"
require "securerandom"

module TaskerCore
  class Web
    # CSRF protection without a session store: a random id in an HttpOnly,
    # SameSite=Strict cookie; the forms carry HMAC(secret, id). A POST must
    # bring both, matching, so a page on another site can neither read the
    # token nor make one for a cookie it planted (it has no secret). When the
    # browser sends Origin (every current one does on a POST) it must be this
    # host.
    class Csrf
      COOKIE = "tasker_web_csrf"
      FIELD = "authenticity_token"

      def initialize(request, secret)
        @req = request
        @secret = secret
        @id = request.cookies[COOKIE]
        @id = nil unless @id.is_a?(String) && @id.match?(/\A\h{32}\z/)
        @new_id = nil
      end

      def token = sign(id)

      # nil when the POST may go on, else why not.
      def refusal
        origin = @req.get_header("HTTP_ORIGIN")
        return "cross-origin request (Origin #{origin})" if origin && origin != @req.base_url
        return "missing CSRF cookie (reload the page)" unless @id

        given = @req.POST[FIELD].to_s
        "invalid CSRF token (reload the page)" unless Rack::Utils.secure_compare(given, sign(@id))
      end

      def set_cookie(headers)
        return unless @new_id

        cookie = { value: @new_id, path: cookie_path, httponly: true, same_site: :strict, secure: @req.ssl? }
        if Rack::Utils.respond_to?(:set_cookie_header)
          headers["set-cookie"] = Rack::Utils.set_cookie_header(COOKIE, cookie)
        else # rack 2 (Rails 7.0)
          Rack::Utils.set_cookie_header!(headers, COOKIE, cookie)
        end
      end

      private

      def id = @id || (@new_id ||= SecureRandom.hex(16))

      def sign(value) = OpenSSL::HMAC.hexdigest("SHA256", @secret, value)

      def cookie_path = @req.script_name.to_s.empty? ? "/" : @req.script_name
    end
  end
end
