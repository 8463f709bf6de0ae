# frozen_string_literal: true

require "json"

module TaskerCore
  class Web
    # Text for values read from the store. Everything returned here is plain
    # text: the views escape it (ERB::Util#h) like any other task data.
    module Display
      STATE_COLOURS = {
        "pending" => "#9ca3af", "enqueued" => "#60a5fa", "in_progress" => "#2563eb", "complete" => "#16a34a",
        "resolved_manually" => "#0d9488", "error" => "#dc2626", "cancelled" => "#6b7280"
      }.freeze
      BINARY_PREVIEW = 64

      module_function

      # A stored payload (msgpack) as indented JSON-like text. Binary strings
      # (msgpack bin, or bytes that are not UTF-8) become "<N bytes: hex...>";
      # bytes msgpack cannot read are shown the same way, never raised.
      def payload_text(bytes)
        return "" if bytes.nil?

        JSON.pretty_generate(printable(Codec.unpack(bytes)))
      rescue StandardError => e
        "#{binary_text(bytes)} (not msgpack: #{e.class.name})"
      end

      def printable(value)
        case value
        when Hash then value.to_h { |k, v| [printable_key(k), printable(v)] }
        when Array then value.map { |v| printable(v) }
        when String then text?(value) ? value : binary_text(value)
        when Float then value.finite? ? value : value.to_s
        when Integer, true, false, nil then value
        else value.to_s
        end
      end

      def printable_key(key) = key.is_a?(String) && text?(key) ? key : printable(key).to_s

      def text?(str) = str.dup.force_encoding(Encoding::UTF_8).valid_encoding? && str.encoding != Encoding::BINARY

      def binary_text(bytes)
        hex = bytes.byteslice(0, BINARY_PREVIEW).unpack1("H*").scan(/../).join(" ")
        "<#{bytes.bytesize} bytes: #{hex}#{' ...' if bytes.bytesize > BINARY_PREVIEW}>"
      end

      # A stored error (msgpack {"class", "message", "backtrace", ...}) as
      # "Class: message" and the backtrace, one frame a line.
      def error_text(bytes)
        error = decode(bytes)
        return payload_text(bytes) unless error.is_a?(Hash)

        head = [error["class"], error["message"]].compact.map { |v| printable(v).to_s }.join(": ")
        trace = Array(error["backtrace"]).map { |l| "  #{printable(l)}" }
        rest = error.except("class", "message", "backtrace")
        [head, *trace, *(rest.empty? ? [] : [JSON.generate(printable(rest))])].join("\n")
      end

      def error_summary(bytes, max: 160)
        text = error_text(bytes).lines.first.to_s.strip
        text.size > max ? "#{text[0, max - 1]}…" : text
      end

      def decode(bytes)
        bytes && Codec.unpack(bytes)
      rescue StandardError
        nil
      end

      # Epoch seconds (float) -> "2026-11-30 06:05:04.123Z"
      def stamp(epoch) = epoch && Time.at(epoch).utc.strftime("%Y-%m-%d %H:%M:%S.%LZ")

      def duration(seconds)
        return "" if seconds.nil?
        return "#{(seconds * 1000).round(1)} ms" if seconds < 1
        return "#{seconds.round(2)} s" if seconds < 120

        "#{(seconds / 60).round(1)} min"
      end

      def age_ms(ms) = ms.nil? ? "" : duration(ms / 1000.0) + " ago"

      def state_colour(state) = STATE_COLOURS.fetch(state, "#a855f7")
    end
  end
end
